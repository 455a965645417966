"""``python -m pipeline <stage> ...``: the jobs without spark-submit, on the config's master."""
import sys

from pipeline.cli import main

sys.exit(main())

"""spark-submit entry point for the ingest stage.

    spark-submit jobs/ingest.py --input URI --output URI [--mode error|overwrite|append] [--config FILE] [--set k=v]...
    spark-submit jobs/ingest.py --input-list URI [--input URI] --output URI ...

Thin on purpose: ``run_stage`` parses the flags, loads the config, builds the
SparkSession (spark-submit's master wins), calls ``pipeline.ingest.run`` and stops
the session in ``finally``; errors become one line and an exit code.
"""
from __future__ import annotations

import sys

from pipeline.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("ingest", sys.argv[1:], prog="jobs/ingest.py"))

"""spark-submit entry point for the score stage.

    spark-submit jobs/score.py --data URI --model URI --output URI [--split test] [--mode error|overwrite] [--config FILE] [--set k=v]...

Thin on purpose: ``run_stage`` parses the flags, loads the config, builds the
SparkSession (spark-submit's master wins), calls ``pipeline.score.run`` and stops
the session in ``finally``; errors become one line and an exit code.
"""
from __future__ import annotations

import sys

from pipeline.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("score", sys.argv[1:], prog="jobs/score.py"))

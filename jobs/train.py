"""spark-submit entry point for the train stage.

    spark-submit jobs/train.py --data URI --model-dir URI [--num-proc N] [--epochs E] [--mode resume|overwrite] [--config FILE] [--set k=v]...

Thin on purpose: ``run_stage`` parses the flags, loads the config, builds the
SparkSession (spark-submit's master wins), calls ``pipeline.train.run`` and stops
the session in ``finally``; errors become one line and an exit code.
"""
from __future__ import annotations

import sys

from pipeline.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("train", sys.argv[1:], prog="jobs/train.py"))

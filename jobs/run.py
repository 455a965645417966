"""spark-submit entry point for the whole chain: ingest -> train -> score -> report (single-cluster use).

    spark-submit jobs/run.py --input URI --output-root URI [--split test] [--num-proc N] [--epochs E] [--fresh] [--config FILE] [--set k=v]...

Thin on purpose: ``run_stage`` parses the flags, loads the config, builds the
SparkSession (spark-submit's master wins), calls ``pipeline.chain.run`` and stops
the session in ``finally``; errors become one line and an exit code.
"""
from __future__ import annotations

import sys

from pipeline.cli import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("run", sys.argv[1:], prog="jobs/run.py"))

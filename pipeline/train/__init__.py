"""The train stage: Horovod-on-Spark training of an image classifier.

``run(spark, cfg, *, data_uri, model_dir, mode)`` is the stage's entry point (the CLI and
``jobs/train.py`` call it); :mod:`pipeline.train.driver` holds it, the code each Horovod
process runs is :mod:`pipeline.train.worker`.
"""
from __future__ import annotations

from pipeline.train.driver import horovod_env, run

__all__ = ["horovod_env", "run"]

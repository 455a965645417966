"""The train stage: Horovod-on-Spark training of an image classifier.

``run(spark, cfg, *, data_uri, model_dir, mode)`` is the stage's entry point (the CLI and
``jobs/train.py`` call it). The modules, in the order a run meets them:

* :mod:`~pipeline.train.driver` - validate, fingerprint, an existing result, the launch, failures;
* :mod:`~pipeline.train.progress` - rank 0's ``_progress.json``, its reader and the driver's watchdog;
* :mod:`~pipeline.train.worker` - ``train_fn``, what each Horovod process runs: the epoch loop;
* :mod:`~pipeline.train.gpu`, :mod:`~pipeline.train.models` - the process's GPU, the Keras model;
* :mod:`~pipeline.train.schedule` - learning rate (Keras ``CosineDecay``) and early stopping;
* :mod:`~pipeline.train.checkpoints` - epoch checkpoints: save, find, load, prune;
* :mod:`~pipeline.train.outputs` - history, curves, TensorBoard, ``model.keras`` and ``model.json``.
"""
from __future__ import annotations

from pipeline.train.driver import horovod_env, run

__all__ = ["horovod_env", "run"]

"""Stack self-checks that run for real: Arrow UDFs, petastorm -> tf.data, Horovod over Gloo.

``python -m pipeline.diagnostics`` (or under spark-submit on a cluster) runs
them all and exits non-zero when one fails, so a new environment can be
checked before any data moves.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import pandas as pd  # module level: pandas UDF type hints are resolved against module globals

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def horovod_allreduce_check(steps: int = 3, seed_offset: int = 0) -> Dict[str, Any]:
    """Runs inside each Horovod process: allreduce a sum, train a tiny Keras 3 model.

    Returns the rank, the allreduced sum and a fingerprint of the final weights,
    which must be identical on every rank after broadcast + averaged gradients.
    """
    import numpy as np
    import tensorflow as tf
    import horovod.tensorflow as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    total = float(hvd.allreduce(tf.constant(float(rank + 1)), op=hvd.Sum).numpy())

    tf.keras.utils.set_random_seed(1234 + rank + seed_offset)  # different init per rank on purpose
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(8, activation="relu"),
                                 tf.keras.layers.Dense(2)])
    opt = tf.keras.optimizers.SGD(0.1)
    for v in model.variables:
        v.assign(hvd.broadcast(v.value, root_rank=0))
    rng = np.random.default_rng(rank)
    x = tf.constant(rng.normal(size=(16, 4)).astype("float32"))
    y = tf.constant(rng.integers(0, 2, size=16))
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses: List[float] = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, [v.value for v in model.trainable_variables])
        opt.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))
    weights = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
    return {"rank": rank, "size": size, "sum": total, "weights": weights.tolist(), "losses": losses,
            "gloo": bool(hvd.gloo_enabled())}


def check_horovod(num_proc: int = 2, nics: Optional[Sequence[str]] = ("lo",), start_timeout: int = 120) -> List[Dict[str, Any]]:
    import horovod.spark

    return horovod.spark.run(horovod_allreduce_check, num_proc=num_proc, start_timeout=start_timeout,
                             nics=list(nics) if nics else None, use_gloo=True, verbose=0)


def check_arrow_udf(spark: "SparkSession") -> int:
    from pyspark.sql import functions as F

    @F.pandas_udf("long")
    def plus_one(s: pd.Series) -> pd.Series:
        return s + 1

    return int(spark.range(100).select(F.sum(plus_one("id"))).first()[0])


def main(argv: Optional[Sequence[str]] = None) -> int:
    from pipeline.config import load_config
    from pipeline.spark import build_session

    logging.basicConfig(level=logging.INFO)
    cfg = load_config(overrides=list(argv or []))
    spark = build_session(cfg.spark, app_suffix="diagnostics")
    try:
        out: Dict[str, Any] = {"arrow_udf_sum": check_arrow_udf(spark)}
        res = check_horovod(cfg.train.num_proc, cfg.train.nics, cfg.train.start_timeout)
        out["horovod_sums"] = [r["sum"] for r in res]
        out["horovod_weights_identical"] = all(r["weights"] == res[0]["weights"] for r in res)
        ok = out["arrow_udf_sum"] == 5050 and out["horovod_weights_identical"]
        print(json.dumps(out))
        return 0 if ok else 1
    finally:
        spark.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

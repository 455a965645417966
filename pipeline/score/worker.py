"""What runs in Spark's Python workers: the cached model, the ``mapInArrow`` bodies, Arrow batch building.

As in ``pyspark.ml.functions.predict_batch_udf``, a factory (:func:`make_predict_fn`)
builds the batch predict function and each Python worker keeps it (:func:`predict_fn`),
so the model is loaded once per worker, not once per task. Everything a worker needs
travels in one small picklable :class:`ScoringPlan`. Rows are decoded and predicted a
batch at a time and the output batches are built column-wise in Arrow: no per-row
Python work on the good path.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from pipeline import faults
from pipeline.imaging.stored import ImageSpec, Normalization, decode_images
from pipeline.schema import REJECT_COLUMNS, REJECT_FIELDS, SPLIT_COLUMN, Field

log = logging.getLogger(__name__)

#: The columns of ``<out>/predictions/`` (docs/contracts.md "Score output").
PREDICTION_FIELDS: Tuple[Field, ...] = (
    Field("image_id", str, "string"),
    Field("source_path", str, "string"),
    Field("label", str, "string", True),               # null when the data is unlabeled
    Field("split", str, "string"),
    Field("pred_label", str, "string"),
    Field("pred_index", int, "int"),
    Field("probability", float, "float"),              # probability of pred_label
    Field("top_k_labels", list, "array<string>"),      # most probable first
    Field("top_k_probabilities", list, "array<float>"),
    Field("model_id", str, "string"),                  # from model.json
    Field("scored_at", object, "timestamp"),           # one timestamp per run (UTC)
)
PREDICTION_COLUMNS = tuple(f.name for f in PREDICTION_FIELDS)


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """Everything a Python worker needs; small and picklable."""

    model_path: str            # a worker-local path, or a SparkFiles name when shipped
    shipped: bool
    model_id: str
    classes: Tuple[str, ...]
    spec: ImageSpec
    norm: Normalization
    batch_size: int
    top_k: int
    intra_op_threads: int
    inter_op_threads: int
    scored_at: _dt.datetime
    fault: Optional[faults.FaultPlan] = None


# --- the model, once per Python worker ----------------------------------------------------

#: Per-Python-worker cache: (path, model_id) -> compiled predict function.
_WORKER_MODELS: Dict[Tuple[str, str], Callable[[Any], Any]] = {}
_TF_THREADS_SET = False


def _configure_tf(intra: int, inter: int) -> None:
    """Pin TF's thread pools once per worker, before TF runs anything."""
    global _TF_THREADS_SET
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if _TF_THREADS_SET:
        return
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TF already initialised in this process: keep what it has
        log.warning("TF was initialised before pixelmill could pin its threads in this worker (intra %s, inter %s)",
                    tf.config.threading.get_intra_op_parallelism_threads(),
                    tf.config.threading.get_inter_op_parallelism_threads())
    _TF_THREADS_SET = True


def make_predict_fn(plan: ScoringPlan) -> Callable[[Any], Any]:
    """Load the model and compile ``0..255 float32 pixels (n, h, w, c) -> probabilities (n, k)``.

    Normalisation runs inside the same graph as the model (one call per batch).
    """
    _configure_tf(plan.intra_op_threads, plan.inter_op_threads)
    import keras
    import tensorflow as tf

    path = plan.model_path
    if plan.shipped:
        from pyspark import SparkFiles

        path = SparkFiles.get(plan.model_path)
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
    mean = tf.constant(plan.norm.mean, tf.float32)
    std = tf.constant(plan.norm.std, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec((None,) + plan.spec.shape, tf.float32)])
    def predict(pixels: Any) -> Any:
        return model((pixels - mean) / std, training=False)

    return predict


def predict_fn(plan: ScoringPlan) -> Callable[[Any], Any]:
    """This worker's predict function for ``plan``'s model, built by :func:`make_predict_fn` once."""
    key = (plan.model_path, plan.model_id)
    if key not in _WORKER_MODELS:
        _WORKER_MODELS.clear()  # one model per worker at a time: memory stays bounded
        _WORKER_MODELS[key] = make_predict_fn(plan)
    return _WORKER_MODELS[key]


# --- Arrow batches --------------------------------------------------------------------------

def arrow_schema(fields: Sequence[Field]) -> Any:
    """The Arrow schema Spark expects back from ``mapInArrow`` for ``fields``."""
    import pyarrow as pa

    types = {"string": pa.string(), "int": pa.int32(), "float": pa.float32(),
             "array<string>": pa.list_(pa.string()), "array<float>": pa.list_(pa.float32()),
             "timestamp": pa.timestamp("us", tz="UTC")}
    return pa.schema([pa.field(f.name, types[f.spark_type], f.nullable) for f in fields])


def prediction_batch(rows: Any, probs: Any, plan: ScoringPlan) -> Any:
    """Prediction rows (``PREDICTION_FIELDS``) for the Arrow ``rows`` and their probabilities, built column-wise."""
    import numpy as np
    import pyarrow as pa

    m, k = probs.shape
    top = min(plan.top_k, k)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    top_p = np.take_along_axis(probs, order, axis=1).astype(np.float32)
    names = pa.array(plan.classes, pa.string())
    pred_index = order[:, 0].astype(np.int32)
    offsets = pa.array(np.arange(0, m * top + 1, top, dtype=np.int32))
    stamp = np.datetime64(int(plan.scored_at.timestamp() * 1_000_000), "us")
    return pa.RecordBatch.from_arrays([
        rows.column("image_id"), rows.column("source_path"), rows.column("label"), rows.column(SPLIT_COLUMN),
        names.take(pa.array(pred_index)),
        pa.array(pred_index, pa.int32()),
        pa.array(top_p[:, 0], pa.float32()),
        pa.ListArray.from_arrays(offsets, names.take(pa.array(order.reshape(-1)))),
        pa.ListArray.from_arrays(offsets, pa.array(top_p.reshape(-1), pa.float32())),
        pa.array([plan.model_id], pa.string()).take(pa.array(np.zeros(m, dtype=np.int32))),
        pa.array(np.full(m, stamp), pa.timestamp("us", tz="UTC")),
    ], schema=arrow_schema(PREDICTION_FIELDS))


def reject_batch(rows: Any, errors: Mapping[int, Tuple[str, str]]) -> Any:
    """Reject rows (``REJECT_FIELDS``) for the rows of ``rows`` listed in ``errors``."""
    import pyarrow as pa

    idx = pa.array(sorted(errors), pa.int32())
    by_name = {
        "source_path": rows.column("source_path").take(idx),
        "reason": pa.array([errors[i][0] for i in sorted(errors)], pa.string()),
        "detail": pa.array([errors[i][1] for i in sorted(errors)], pa.string()),
        "image_id": rows.column("image_id").take(idx),
    }
    return pa.RecordBatch.from_arrays([by_name[c] for c in REJECT_COLUMNS], schema=arrow_schema(REJECT_FIELDS))


# --- the mapInArrow bodies ------------------------------------------------------------------

def _chunks(batches: Iterator[Any], size: int) -> Iterator[Any]:
    for rb in batches:
        for start in range(0, rb.num_rows, size):
            yield rb.slice(start, size)


def score_partition(batches: Iterator[Any], plan: ScoringPlan, rejects_seen: Any = None) -> Iterator[Any]:
    """``mapInArrow`` body: predictions for every decodable row, ``plan.batch_size`` rows per model call.

    Rows that cannot be decoded are not output here; their number is added to the
    ``rejects_seen`` accumulator, so the driver knows whether the rejects pass must run.
    """
    import numpy as np
    from pyspark import TaskContext

    ctx = TaskContext.get()
    predict = predict_fn(plan)
    k = len(plan.classes)
    for done, chunk in enumerate(_chunks(batches, plan.batch_size), start=1):
        pixels, good, errors = decode_images(chunk.column("image"), plan.spec)
        if errors and rejects_seen is not None:
            rejects_seen.add(len(errors))
        if good.any():
            probs = np.asarray(predict(pixels), dtype=np.float32).reshape(-1, k)
            rows = chunk if good.all() else chunk.filter(good)
            yield prediction_batch(rows, probs, plan)
        if done == 1:  # after some output was produced: a failure "mid-way"
            faults.fire(plan.fault, "score.batch", partition=ctx.partitionId(), attempt=ctx.attemptNumber())


def reject_partition(batches: Iterator[Any], plan: ScoringPlan) -> Iterator[Any]:
    """``mapInArrow`` body of the rejects pass: the same decoding as scoring, no model; reject rows only."""
    for chunk in _chunks(batches, plan.batch_size):
        _, _, errors = decode_images(chunk.column("image"), plan.spec)
        if errors:
            yield reject_batch(chunk, errors)

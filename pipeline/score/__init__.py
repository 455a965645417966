"""Distributed batch scoring of an ingest output back to Parquet, with evaluation.

``run(spark, cfg, data_uri=..., model_uri=..., output_uri=..., split=..., mode=...)``

1. Checks everything cheap on the driver before any output is touched: the
   ingest output is committed, the model exists and loads with Keras safe mode,
   its ``model.json`` agrees with the data (image size, channels, class mapping)
   and with the model itself (input shape, number of outputs, ``model_id`` =
   sha256 of ``model.keras``).
2. Scores with ``mapInPandas``: every Python worker loads the model once
   (module-level cache keyed by path and ``model_id``) and runs it on batches of
   ``score.batch_size`` decoded images (:func:`pipeline.preprocess.decode_batch`,
   whose header check is the decompression-bomb guard of this path).
3. Writes ``<out>/predictions/`` (partitioned by ``score.partition_by``) and,
   when labels exist, ``_metrics.json`` + ``confusion_matrix.png`` computed with
   Spark aggregations, all inside :func:`pipeline.storage.atomic_output`: a
   failed or killed run leaves nothing at ``<out>``, a rerun never mixes in
   debris.

Every input row is accounted for: it is either a prediction or, when its stored
bytes cannot be decoded to the model's image size (corrupt or planted data),
a row of ``<out>/rejects/`` (``pipeline.schema.REJECT_FIELDS``); the job checks
``rows_in == predictions + rejected`` before it commits.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import logging
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from pipeline import metrics as _metrics
from pipeline.config import Config
from pipeline.errors import ConfigError, DataError, InvariantError, OutputExistsError
from pipeline.preprocess import ImageSpec, Normalization, check_header, decode_batch, header_size, png_headers_match
from pipeline.schema import REJECT_COLUMNS, REJECT_FIELDS, SPLIT_COLUMN, SPLITS, UNLABELED_SPLIT, Field, ddl
from pipeline.spark import assert_on_driver, is_local_master, set_job_description, task_slots, temporary_confs
from pipeline.storage import (
    COMMIT_MARKER, HadoopFS, atomic_output, check_output_mode, join, local_path, parent_and_name, to_uri,
)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

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
_PREDICTION_DDL = ddl(PREDICTION_FIELDS)
_REJECT_DDL = ddl(REJECT_FIELDS)
_INPUT_COLUMNS = ("image_id", "source_path", "label", SPLIT_COLUMN, "image")

MODEL_JSON = "model.json"
MODEL_FILE = "model.keras"
MANIFEST = "_manifest.json"
#: Spark local property that makes one scoring task fail once, mid-way (tests of reruns).
#: Value ``raise:<partition>`` or ``exit:<partition>`` (the Python worker dies).
FAULT_PROPERTY = "pixelmill.fault.score"
SPLIT_CHOICES = SPLITS + (UNLABELED_SPLIT, "all")
MODE_CHOICES = ("error", "overwrite")


# --- the model and its description ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A training output's exported model and what ``model.json`` says about it."""

    model_dir: str
    keras_uri: str
    model_id: str
    classes: Tuple[str, ...]          # index order
    spec: ImageSpec
    norm: Normalization
    meta: Mapping[str, Any]


def resolve_model_dir(fs: HadoopFS, model_uri: str) -> str:
    """The training ``--model-dir`` for ``model_uri`` (the dir itself, its ``model/`` or ``model.keras``)."""
    u = model_uri.rstrip("/")
    parent, name = parent_and_name(u)
    if name == MODEL_FILE:
        u, (parent, name) = parent, parent_and_name(parent)
    if fs.exists(join(u, "model", MODEL_FILE)):
        return u
    if name == "model" and fs.exists(join(u, MODEL_FILE)):
        return parent
    hint = ""
    if fs.exists(join(u, "checkpoints")):
        hint = "; training left checkpoints but no exported model: let it finish (rerun train with --mode resume)"
    raise DataError(f"no trained model at {model_uri}: expected <model-dir>/model/{MODEL_FILE} and "
                    f"<model-dir>/{MODEL_JSON} (pass a finished training's --model-dir or its model/ to --model){hint}")


def read_model_info(fs: HadoopFS, model_uri: str) -> ModelInfo:
    """Resolve and validate ``model.json`` (no TensorFlow needed)."""
    model_dir = resolve_model_dir(fs, model_uri)
    meta_uri = join(model_dir, MODEL_JSON)
    if not fs.exists(meta_uri):
        raise DataError(f"{meta_uri} is missing: the model has no description (re-export it with train)")
    try:
        meta = fs.read_json(meta_uri)
    except ValueError as e:
        raise DataError(f"{meta_uri} is not valid JSON ({e}): re-export the model with train") from None
    for key in ("model_id", "classes", "image", "normalization"):
        if key not in meta:
            raise DataError(f"{meta_uri} lacks '{key}': re-export the model with train")
    classes = _class_order(meta["classes"], meta_uri)
    try:
        spec = ImageSpec.from_manifest(meta)
        norm = Normalization.from_dict(meta["normalization"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{meta_uri} has a bad 'image' or 'normalization' entry ({e!r}): re-export the model") from None
    if len(norm.mean) != spec.channels or len(norm.std) != spec.channels:
        raise DataError(f"{meta_uri}: normalization has {len(norm.mean)} channel(s) but image has {spec.channels}")
    return ModelInfo(model_dir, join(model_dir, "model", MODEL_FILE), str(meta["model_id"]), classes, spec, norm, meta)


def _class_order(classes: Any, where: str) -> Tuple[str, ...]:
    if not isinstance(classes, Mapping) or not classes:
        raise DataError(f"{where}: 'classes' must map class names to indices 0..k-1")
    by_index = {int(i): str(n) for n, i in classes.items()}
    if sorted(by_index) != list(range(len(classes))):
        raise DataError(f"{where}: class indices must be 0..{len(classes) - 1}, got {sorted(classes.values())}")
    return tuple(by_index[i] for i in range(len(classes)))


def check_compatible(model: ModelInfo, manifest: Mapping[str, Any], data_uri: str) -> None:
    """Raise DataError when the model and the ingest output disagree (size, channels, classes)."""
    img = manifest.get("image") or {}
    try:
        data_spec = ImageSpec.from_manifest(manifest)
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{data_uri}/{MANIFEST} has no 'image' entry: re-run ingest") from None
    m = model.spec
    if (data_spec.height, data_spec.width) != (m.height, m.width):
        raise DataError(
            f"image size differs: model {model.model_id} expects {m.height}x{m.width} (height x width) but {data_uri} "
            f"holds {data_spec.height}x{data_spec.width}: ingest the data with ingest.height={m.height} "
            f"ingest.width={m.width}, or score with the model trained on it")
    if data_spec.channels != m.channels:
        mode = "L" if m.channels == 1 else "RGB"
        raise DataError(
            f"channels differ: model {model.model_id} expects {m.channels} but {data_uri} holds "
            f"{data_spec.channels} ({img.get('color_mode', '?')}): ingest the data with ingest.color_mode={mode}")
    model_index = {n: i for i, n in enumerate(model.classes)}
    for name, idx in sorted((manifest.get("classes") or {}).items(), key=lambda kv: kv[1]):
        if name not in model_index:
            raise DataError(
                f"class mapping differs: data class {name!r} is unknown to model {model.model_id} "
                f"(model classes: {', '.join(model.classes)}): score with a model trained on these classes")
        if int(idx) != model_index[name]:
            raise DataError(
                f"class mapping differs: {name!r} is index {idx} in {data_uri} but {model_index[name]} in model "
                f"{model.model_id}: ingest the data with the training data's classes (ingest --mode append)")


def _sha256_16(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _copy_to_local(spark: "SparkSession", uri: str, dst: str) -> None:
    jvm = spark.sparkContext._jvm  # noqa: SLF001
    conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001
    src = jvm.org.apache.hadoop.fs.Path(uri)
    local = jvm.org.apache.hadoop.fs.Path("file://" + dst)
    # FileUtil.copy: copyToLocalFile casts file:// to LocalFileSystem (fails under RawLocalFileSystem).
    jvm.org.apache.hadoop.fs.FileUtil.copy(src.getFileSystem(conf), src, local.getFileSystem(conf), local, False, True, conf)


def _driver_model_file(spark: "SparkSession", model: ModelInfo) -> str:
    """A driver-local copy of ``model.keras`` named by its id (the file itself when local)."""
    path = local_path(model.keras_uri)
    if path is None:
        cache = os.path.join(tempfile.gettempdir(), "pixelmill-models")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"model-{model.model_id}.keras")
        if not (os.path.exists(path) and _sha256_16(path) == model.model_id):
            tmp = f"{path}.{os.getpid()}.part"
            _copy_to_local(spark, model.keras_uri, tmp)
            os.replace(tmp, path)
    digest = _sha256_16(path)
    if digest != model.model_id:
        raise DataError(f"{model.keras_uri} does not match its {MODEL_JSON} (model_id {model.model_id}, file sha256 "
                        f"{digest}...): the model was replaced after export; re-export it with train")
    return path


#: Models this driver process has loaded and checked, by (file, model_id): the id is the file's
#: sha256 (verified on every run), so the same id means the same bytes and the same verdict.
_CHECKED_MODELS: set = set()


def check_model_file(path: str, model: ModelInfo) -> None:
    """Load the model once on the driver (safe mode) and check its input and output shapes."""
    key = (path, model.model_id, model.spec, len(model.classes))
    if key in _CHECKED_MODELS:
        return
    import keras

    try:
        m = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as e:  # noqa: BLE001 - any load failure is one clear line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot load {model.keras_uri} with Keras safe mode: {first}") from None
    in_shape = tuple(m.inputs[0].shape[1:]) if m.inputs else ()
    if len(in_shape) != 3 or any(d is not None and d != e for d, e in zip(in_shape, model.spec.shape)):
        raise DataError(f"model input shape {in_shape} disagrees with {MODEL_JSON} image "
                        f"{model.spec.shape} (height, width, channels): re-export the model with train")
    out = m.outputs[0].shape[-1] if m.outputs else None
    if out != len(model.classes):
        raise DataError(f"model outputs {out} classes but {MODEL_JSON} lists {len(model.classes)}: "
                        "re-export the model with train")
    _CHECKED_MODELS.add(key)


# --- the executor side -----------------------------------------------------------

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
    fault: Optional[str] = None


#: Per-Python-worker caches: (path, model_id) -> compiled predict function; ImageSpec -> decoder.
_WORKER_MODELS: Dict[Tuple[str, str], Any] = {}
_WORKER_DECODERS: Dict[ImageSpec, Any] = {}
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


def worker_model(plan: ScoringPlan) -> Any:
    """A ``tf.function`` mapping 0..255 float32 pixels to probabilities; loaded once per Python worker.

    Normalisation runs inside the same graph as the model (one call per batch).
    """
    key = (plan.model_path, plan.model_id)
    hit = _WORKER_MODELS.get(key)
    if hit is not None:
        return hit
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

    _WORKER_MODELS.clear()  # one model per worker at a time: memory stays bounded
    _WORKER_MODELS[key] = predict
    return predict


def worker_decoder(spec: ImageSpec) -> Any:
    """A ``tf.function`` decoding a batch of encoded PNGs to float32 ``(n, h, w, c)`` 0..255 pixels.

    Only for images whose header :func:`pipeline.preprocess.png_headers_match` accepted
    (exact size, 8-bit, ``spec.channels``): the bomb check happens before, on the whole batch.
    """
    hit = _WORKER_DECODERS.get(spec)
    if hit is not None:
        return hit
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string)])
    def decode(images: Any) -> Any:
        pixels = tf.map_fn(lambda b: tf.ensure_shape(tf.io.decode_png(b, channels=spec.channels), spec.shape),
                           images, fn_output_signature=tf.TensorSpec(spec.shape, tf.uint8))
        return tf.cast(pixels, tf.float32)

    _WORKER_DECODERS[spec] = decode
    return decode


def _binary_layout(arr: Any) -> Tuple[Any, Any, Any]:
    """``(data, offsets, valid)`` numpy views of an Arrow binary array (no copy of the bytes)."""
    import numpy as np
    import pyarrow as pa

    n = len(arr)
    valid = np.ones(n, dtype=bool) if arr.null_count == 0 else ~np.asarray(arr.is_null())
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, dtype=off_type)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data, offsets, valid


def _decode_one(data: Optional[bytes], spec: ImageSpec) -> Tuple[Any, Optional[Tuple[str, str]]]:
    """The careful path for one image: header check, then Pillow; ``(pixels, None)`` or ``(None, (reason, detail))``."""
    size = None
    try:
        data = bytes(data) if data is not None else b""
        size = header_size(data)
        if size is not None and size != (spec.width, spec.height):
            check_header(data, spec)  # raises with the size in the message
        return decode_batch([data], spec)[0], None
    except Exception as e:  # noqa: BLE001 - every failure is a reject with its reason
        reason = "wrong_size" if size is not None and size != (spec.width, spec.height) else "undecodable"
        if reason == "undecodable" and "shape" in str(e):
            reason = "wrong_shape"
        return None, (reason, (str(e).strip().splitlines() or [type(e).__name__])[0][:500])


def decode_images(images: Any, spec: ImageSpec) -> Tuple[Any, Any, Dict[int, Tuple[str, str]]]:
    """Decode an Arrow binary array: ``(pixels of the good rows, good mask, {row: (reason, detail)})``.

    PNGs whose header says exactly ``spec`` (checked for the whole batch at once, the
    decompression-bomb guard) are decoded in one TensorFlow call; everything else, and a batch
    the fast decoder refuses, goes through :func:`_decode_one` row by row, which finds the reason.
    """
    import numpy as np

    n = len(images)
    data, offsets, valid = _binary_layout(images)
    fast = png_headers_match(data, offsets, spec) & valid
    blobs = images.to_pylist()
    if fast.all():
        try:
            return worker_decoder(spec)(blobs), np.ones(n, dtype=bool), {}
        except Exception:  # noqa: BLE001 - a body that does not decode: find it row by row
            fast[:] = False
    pixels = np.zeros((n,) + spec.shape, dtype=np.float32)
    if fast.any():
        rows = np.flatnonzero(fast)
        try:
            pixels[rows] = worker_decoder(spec)([blobs[i] for i in rows]).numpy()
        except Exception:  # noqa: BLE001
            fast[:] = False
    errors: Dict[int, Tuple[str, str]] = {}
    for i in np.flatnonzero(~fast):
        px, err = _decode_one(blobs[i], spec)
        if err is None:
            pixels[i] = px
        else:
            errors[int(i)] = err
    good = np.ones(n, dtype=bool)
    good[list(errors)] = False
    return pixels[good], good, errors


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


def _fault_hook(plan: ScoringPlan) -> Optional[str]:
    """The fault this task must inject (``raise``/``exit``), from :data:`FAULT_PROPERTY`."""
    if not plan.fault:
        return None
    from pyspark import TaskContext

    ctx = TaskContext.get()
    kind, _, part = plan.fault.partition(":")
    if ctx is None or ctx.attemptNumber() > 0 or str(ctx.partitionId()) != part.strip():
        return None
    return kind.strip()


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

    predict = worker_model(plan)
    k = len(plan.classes)
    fault = _fault_hook(plan)
    for done, chunk in enumerate(_chunks(batches, plan.batch_size), start=1):
        pixels, good, errors = decode_images(chunk.column("image"), plan.spec)
        if errors and rejects_seen is not None:
            rejects_seen.add(len(errors))
        if good.any():
            probs = np.asarray(predict(pixels), dtype=np.float32).reshape(-1, k)
            rows = chunk if good.all() else chunk.filter(good)
            yield prediction_batch(rows, probs, plan)
        if fault and done == 1:  # fail after some output was produced: "mid-way"
            if fault == "exit":
                os._exit(17)
            raise RuntimeError(f"injected scoring fault ({FAULT_PROPERTY}={plan.fault})")


def reject_partition(batches: Iterator[Any], plan: ScoringPlan) -> Iterator[Any]:
    """``mapInArrow`` body of the rejects pass: the same decoding as scoring, no model; reject rows only."""
    for chunk in _chunks(batches, plan.batch_size):
        _, _, errors = decode_images(chunk.column("image"), plan.spec)
        if errors:
            yield reject_batch(chunk, errors)


# --- the driver side ----------------------------------------------------------------

def _check_choices(split: str, mode: str) -> None:
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split must be one of {', '.join(SPLIT_CHOICES)} (got {split!r})")
    if mode not in MODE_CHOICES:
        raise ConfigError(f"--mode must be one of {', '.join(MODE_CHOICES)} for score (got {mode!r})")


def _check_overlap(data_uri: str, model_dir: str, output_uri: str) -> None:
    """Refuse an output inside (or holding) the data or the model: overwrite would delete them."""
    out = output_uri.rstrip("/")
    for flag, other in (("--data", data_uri), ("--model", model_dir)):
        o = other.rstrip("/")
        if out == o or out.startswith(o + "/") or o.startswith(out + "/"):
            raise ConfigError(f"--output {output_uri} overlaps {flag} {other}: write predictions to a separate folder")


def read_ingest_manifest(fs: HadoopFS, data_uri: str) -> Dict[str, Any]:
    """The committed ingest output's manifest, or a DataError saying what to run."""
    if not fs.exists(join(data_uri, MANIFEST)) or not fs.exists(join(data_uri, COMMIT_MARKER)):
        raise DataError(f"{data_uri} is not a committed ingest output (no {MANIFEST} / {COMMIT_MARKER}): "
                        "pass ingest's --output to --data, or re-run ingest")
    try:
        return fs.read_json(join(data_uri, MANIFEST))
    except ValueError as e:
        raise DataError(f"{data_uri}/{MANIFEST} is not valid JSON ({e}): re-run ingest") from None


def _available_splits(fs: HadoopFS, data_uri: str, manifest: Mapping[str, Any]) -> Dict[str, int]:
    splits = manifest.get("splits")
    if isinstance(splits, Mapping):
        return {str(k): int(v) for k, v in splits.items() if int(v) > 0}
    prefix = f"{SPLIT_COLUMN}="
    found = [parent_and_name(u)[1] for u in fs.list(join(data_uri, "images"))]
    return {n[len(prefix):]: -1 for n in found if n.startswith(prefix)}


def read_split(spark: "SparkSession", data_uri: str, split: str, available: Mapping[str, int]) -> "DataFrame":
    """The ingest rows of ``split`` (``all`` = every split), only the columns scoring needs."""
    from pyspark.sql import functions as F

    if split != "all" and split not in available:
        have = ", ".join(f"{k}={v}" if v >= 0 else k for k, v in sorted(available.items())) or "nothing"
        raise DataError(f"split {split!r} of {data_uri} holds no images (it has: {have}): "
                        "pass --split with one of those, or --split all")
    if not available:
        raise DataError(f"{data_uri} holds no images: nothing to score")
    images = join(data_uri, "images")
    df = spark.read.option("basePath", images).parquet(images)
    if split != "all":
        df = df.filter(F.col(SPLIT_COLUMN) == split)
    return df.select(*_INPUT_COLUMNS)


def run(spark: "SparkSession", cfg: Config, *, data_uri: str, model_uri: str, output_uri: str,
        split: str = "test", mode: str = "error") -> Dict[str, Any]:
    """Score ``split`` of the ingest output ``data_uri`` with a trained model; write ``output_uri``.

    Returns the summary printed by the CLI: ``rows`` (predictions written),
    ``rows_in``, ``rejected``, ``metrics`` (accuracy and macro averages, or None
    when unlabeled), ``model_id``, URIs and timings.
    """
    assert_on_driver()
    t0 = time.time()
    data_uri, model_uri, output_uri = to_uri(data_uri), to_uri(model_uri), to_uri(output_uri)
    scfg = cfg.score
    fs = HadoopFS(spark)
    _check_choices(split, mode)

    # 1. Everything that can be checked before the output is touched.
    model = read_model_info(fs, model_uri)
    _check_overlap(data_uri, model.model_dir, output_uri)
    manifest = read_ingest_manifest(fs, data_uri)
    check_compatible(model, manifest, data_uri)
    available = _available_splits(fs, data_uri, manifest)
    df = read_split(spark, data_uri, split, available)
    driver_file = _driver_model_file(spark, model)
    check_model_file(driver_file, model)
    checks_s = time.time() - t0
    set_job_description(spark, f"pixelmill score: count {split} rows of {data_uri}")
    rows_in = df.count()
    try:
        check_output_mode(fs, output_uri, mode)  # type: ignore[arg-type]
    except OutputExistsError:
        raise OutputExistsError(f"output {output_uri} already exists: pass --mode overwrite to replace it") from None

    # 2. Ship the model: local masters read the driver's file; clusters get it via SparkFiles.
    sc = spark.sparkContext
    shipped = not is_local_master(sc.master)
    worker_path = driver_file
    if shipped:
        sc.addFile(driver_file)
        worker_path = os.path.basename(driver_file)
    scored_at = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    plan = ScoringPlan(
        model_path=worker_path, shipped=shipped, model_id=model.model_id, classes=model.classes,
        spec=model.spec, norm=model.norm, batch_size=scfg.batch_size, top_k=scfg.top_k,
        intra_op_threads=scfg.intra_op_threads, inter_op_threads=scfg.inter_op_threads,
        scored_at=scored_at, fault=sc.getLocalProperty(FAULT_PROPERTY),
    )

    slots = task_slots(spark)
    summary: Dict[str, Any] = {"stage": "score", "split": split, "model_id": model.model_id,
                               "data_uri": data_uri, "model_dir": model.model_dir, "output_uri": output_uri}
    # Arrow batches the size of a model call; the files split along row groups into
    # ~tasks_per_slot tasks per slot (no shuffle of image bytes), so every slot stays busy.
    confs = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(scfg.batch_size),
             "spark.sql.files.minPartitionNum": str(slots * scfg.tasks_per_slot)}
    try:
        with temporary_confs(spark, confs):
            parts = df.rdd.getNumPartitions()
            if parts < slots:  # files too few and too small to split: only then shuffle
                log.info("input has %d partition(s) for %d task slots: repartitioning", parts, slots)
                df, parts = df.repartition(slots), slots
            log.info("scoring split %r of %s (%d rows, %d tasks) with model %s (%d classes, %s) on %d task slots",
                     split, data_uri, rows_in, parts, model.model_id, len(model.classes),
                     "x".join(map(str, model.spec.shape)), slots)
            with atomic_output(spark, output_uri, commit_info=summary) as staging:
                pred_uri, rejects_uri = join(staging, "predictions"), join(staging, "rejects")
                # One pass: decode, predict, write. Undecodable rows are only counted here.
                rejects_seen = sc.accumulator(0)
                set_job_description(spark, f"pixelmill score: predict {rows_in} rows with model {model.model_id}")
                t_score = time.time()
                scored = df.mapInArrow(functools.partial(score_partition, plan=plan, rejects_seen=rejects_seen),
                                       schema=_PREDICTION_DDL)
                writer = scored.select(*PREDICTION_COLUMNS).write.mode("overwrite")
                if scfg.partition_by:
                    writer = writer.partitionBy(scfg.partition_by)
                writer.parquet(pred_uri)
                score_s = time.time() - t_score

                # Counts and metrics from what was written, with one aggregation. Read back with
                # the declared schema: no partition-type inference ("0".."9" labels stay strings).
                t_metrics = time.time()
                set_job_description(spark, f"pixelmill score: count and evaluate the predictions of {rows_in} rows")
                counts, unlabeled = _metrics.confusion_counts(spark.read.schema(_PREDICTION_DDL).parquet(pred_uri))
                written = sum(counts.values()) + unlabeled
                rejected = 0
                if rejects_seen.value or written != rows_in:
                    # Rare: some stored bytes do not decode. Same decoding again, no model, reject rows only.
                    set_job_description(spark, f"pixelmill score: write the rejects of {rows_in} rows")
                    (df.mapInArrow(functools.partial(reject_partition, plan=plan), schema=_REJECT_DDL)
                     .select(*REJECT_COLUMNS).write.mode("overwrite").parquet(rejects_uri))
                    rejected = spark.read.schema(_REJECT_DDL).parquet(rejects_uri).count()
                    if rejected:
                        log.warning("%d row(s) could not be decoded to %s: see %s/rejects/", rejected,
                                    "x".join(map(str, model.spec.shape)), output_uri)
                    else:
                        fs.delete(rejects_uri)
                if written + rejected != rows_in:
                    raise InvariantError(f"scored {rows_in} rows but wrote {written} predictions + {rejected} rejects: "
                                         "output discarded; rerun the job")
                metrics = _metrics.evaluate_counts(counts, unlabeled, model.classes)
                if metrics is not None:
                    _metrics.write_metrics(spark, {**metrics, "model_id": model.model_id, "split": split,
                                                   "data_uri": data_uri, "scored_at": scored_at.isoformat()},
                                           staging, title=f"model {model.model_id}, split {split}")
                metrics_s = time.time() - t_metrics
                total_s = time.time() - t0
                summary.update({
                    "rows": written, "rows_in": rows_in, "rejected": rejected, "tasks": parts,
                    "predictions_uri": join(output_uri, "predictions"),
                    "metrics_uri": join(output_uri, _metrics.METRICS_FILE) if metrics else None,
                    "metrics": None if metrics is None else {
                        k: metrics[k] for k in ("rows", "accuracy", "macro_precision", "macro_recall", "macro_f1")},
                    "scored_at": scored_at.isoformat(),
                    "timings": {"total_s": round(total_s, 3), "checks_s": round(checks_s, 3),
                                "score_s": round(score_s, 3), "metrics_s": round(metrics_s, 3)},
                    "images_per_second": round(rows_in / score_s, 1) if score_s > 0 else None,
                })
    finally:
        set_job_description(spark, None)  # type: ignore[arg-type]
    log.info("scored %d rows (%d rejected) in %.1fs: %s", summary["rows"], summary["rejected"],
             summary["timings"]["total_s"],
             f"accuracy {summary['metrics']['accuracy']:.4f}" if summary["metrics"] else "no labels, no metrics")
    return summary

"""What runs inside each Horovod process launched by :mod:`pipeline.train`.

:func:`train_fn` receives plain data (a dict: URIs, the config as a dict, the
ingest manifest's hash), never the SparkSession. It:

1. sets TensorFlow threading, pins the GPU Spark assigned to the task
   (:mod:`pipeline.train.gpu`), and enables mixed precision when configured;
2. builds the model (:mod:`pipeline.train.models`) from the ingest manifest;
3. rank 0 restores the last complete checkpoint (weights, optimizer state,
   epoch, early-stopping state, history) and broadcasts everything;
4. trains data-parallel with ``hvd.DistributedGradientTape`` (Keras 3 with
   ``horovod.tensorflow``; ``horovod.tensorflow.keras`` is broken on Keras 3),
   learning rate scaled by world size after a linear warm-up, a fixed number
   of steps per epoch on every rank (the dataset layer guarantees it);
5. averages metrics (one allreduce of totals per epoch) and BatchNorm
   statistics across ranks, validates on the val split exactly once per
   epoch, applies early stopping;
6. rank 0 writes a checkpoint per epoch (atomically: a temporary folder, a
   ``_COMPLETE`` marker, one rename), ``history.csv``,
   ``training_curves.png``, TensorBoard logs, and finally ``model/model.keras``
   and ``model.json`` (see docs/contracts.md).

Rank 0 also rewrites ``<model_dir>/_progress.json`` every few seconds while
steps complete (and at each epoch's end, with the epoch line); the driver logs
the epoch lines and its watchdog fails the job when the file stops changing
for longer than ``train.step_timeout``.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

#: Rank 0's progress file in the model-dir; the driver's watchdog reads it.
PROGRESS = "_progress.json"
#: Environment variable the driver forwards for fault-injection tests: ``kill:rank=1:epoch=2:step=3``
#: (SIGKILL that rank there) or ``hang:rank=1:epoch=2:step=3`` (stop making progress).
FAULT_ENV = "PIXELMILL_TRAIN_FAULT"

CHECKPOINTS = "checkpoints"
COMPLETE = "_COMPLETE"
_CKPT_RE = re.compile(r"^epoch-(\d{4,})$")
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate",
                   "images_per_second", "epoch_seconds")


# --- pure helpers (unit-tested without Horovod) --------------------------------

def learning_rate_at(step: int, *, base_lr: float, size: int, warmup_steps: int, schedule: str = "constant",
                     total_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warm-up from ``base_lr`` to ``base_lr * size`` over ``warmup_steps``, then the schedule.

    ``constant`` keeps the peak; ``cosine`` decays it to ``min_ratio x peak``
    at ``total_steps`` (the planned end of training) along a half cosine.

    >>> learning_rate_at(0, base_lr=0.1, size=4, warmup_steps=10)
    0.1
    >>> round(learning_rate_at(5, base_lr=0.1, size=4, warmup_steps=10), 6)
    0.25
    >>> learning_rate_at(10, base_lr=0.1, size=4, warmup_steps=10)
    0.4
    >>> round(learning_rate_at(15, base_lr=0.1, size=4, warmup_steps=10, schedule="cosine", total_steps=20), 6)
    0.2
    """
    target = base_lr * size
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr + (target - base_lr) * (step / warmup_steps)
    if schedule == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        floor = target * min_ratio
        return floor + (target - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return target


@dataclass
class EarlyStopping:
    """Early-stopping state that survives a checkpoint/resume round trip."""

    metric: str
    patience: int
    min_delta: float = 0.0
    best: Optional[float] = None
    best_epoch: int = 0
    wait: int = 0
    stopped: bool = False

    @property
    def mode(self) -> str:
        return "min" if self.metric.endswith("loss") else "max"

    def improved(self, value: float) -> bool:
        if self.best is None or not math.isfinite(self.best):
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, epoch: int, value: float) -> bool:
        """Record ``value`` for ``epoch``; True when training should stop."""
        if self.improved(value):
            self.best, self.best_epoch, self.wait = float(value), int(epoch), 0
        else:
            self.wait += 1
            if self.wait > self.patience:
                self.stopped = True
        return self.stopped

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EarlyStopping":
        return cls(**{k: d[k] for k in ("metric", "patience", "min_delta", "best", "best_epoch", "wait", "stopped")})


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def latest_complete(names: Iterable[str], complete: Iterable[str]) -> Optional[Tuple[int, str]]:
    """``(epoch, name)`` of the newest checkpoint folder whose ``_COMPLETE`` marker exists."""
    done = set(complete)
    best: Optional[Tuple[int, str]] = None
    for name in names:
        m = _CKPT_RE.match(name)
        if m and name in done:
            ep = int(m.group(1))
            if best is None or ep > best[0]:
                best = (ep, name)
    return best


def checkpoints_to_delete(names: Iterable[str], *, keep_last: int, keep_epochs: Iterable[int] = ()) -> List[str]:
    """Checkpoint folders to prune: all but the newest ``keep_last`` and ``keep_epochs``; temp debris too."""
    epochs = sorted((int(m.group(1)), n) for n in names if (m := _CKPT_RE.match(n)))
    keep = {n for _, n in epochs[-keep_last:]} | {checkpoint_name(e) for e in keep_epochs}
    out = [n for _, n in epochs if n not in keep]
    out += [n for n in names if n.startswith(".tmp-")]
    return sorted(out)


def parse_fault(text: Optional[str]) -> Optional[Dict[str, Any]]:
    """``'kill:rank=1:epoch=2:step=3'`` -> ``{'action': 'kill', 'rank': 1, 'epoch': 2, 'step': 3}``."""
    if not text:
        return None
    action, *parts = text.strip().split(":")
    if action not in ("kill", "hang"):
        raise ValueError(f"{FAULT_ENV}: action must be kill or hang, got {action!r}")
    out: Dict[str, Any] = {"action": action, "rank": 1, "epoch": 1, "step": 1}
    for p in parts:
        k, _, v = p.partition("=")
        if k not in ("rank", "epoch", "step"):
            raise ValueError(f"{FAULT_ENV}: unknown field {k!r} (allowed: rank, epoch, step)")
        out[k] = int(v)
    return out


def weights_digest(arrays: Sequence[Any]) -> str:
    """sha256 over the bytes of a list of numpy arrays (order matters)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --- model-dir storage for the Horovod processes (no SparkSession here) --------

class ModelDirStore:
    """Files under a model-dir URI through ``pyarrow.fs`` (file://, hdfs://, s3://, gs://...).

    Writes are atomic per file: bytes go to a temporary name, then one move.
    """

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self.uri = uri.rstrip("/")
        target = "s3://" + self.uri[len("s3a://"):] if self.uri.startswith("s3a://") else self.uri
        try:
            self.fs, root = pafs.FileSystem.from_uri(target)
        except Exception as e:  # noqa: BLE001 - any scheme pyarrow cannot open
            from pipeline.errors import ConfigError

            raise ConfigError(f"--model-dir {uri}: cannot open this filesystem from the training processes "
                              f"({str(e).splitlines()[0]}); use file://, hdfs:// or s3://") from None
        self.root = root.rstrip("/") or "/"
        self._pafs = pafs

    def path(self, rel: str = "") -> str:
        return self.root if not rel else f"{self.root}/{rel.strip('/')}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != self._pafs.FileType.NotFound

    def listdir(self, rel: str = "") -> List[str]:
        if not self.exists(rel):
            return []
        sel = self._pafs.FileSelector(self.path(rel), recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    def mkdirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if parent:
            self.mkdirs(parent)
        tmp = f"{rel}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(self.path(tmp)) as f:
            f.write(data)
        self.fs.move(self.path(tmp), self.path(rel))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def upload(self, local_file: str, rel: str) -> None:
        with open(local_file, "rb") as f:
            self.write_bytes(rel, f.read())

    def download(self, rel: str, local_file: str) -> None:
        with open(local_file, "wb") as f:
            f.write(self.read_bytes(rel))

    def upload_tree(self, local_dir: str, rel: str) -> None:
        for dirpath, _, files in os.walk(local_dir):
            sub = os.path.relpath(dirpath, local_dir)
            for name in files:
                dest = "/".join(p for p in (rel, "" if sub == "." else sub, name) if p)
                self.upload(os.path.join(dirpath, name), dest)

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    def move(self, src: str, dst: str) -> None:
        self.fs.move(self.path(src), self.path(dst))


# --- checkpoints ----------------------------------------------------------------

def find_resume_checkpoint(store: ModelDirStore) -> Optional[Tuple[int, str]]:
    names = store.listdir(CHECKPOINTS)
    complete = [n for n in names if _CKPT_RE.match(n) and store.exists(f"{CHECKPOINTS}/{n}/{COMPLETE}")]
    return latest_complete(names, complete)


def read_checkpoint_state(store: ModelDirStore, name: str) -> Dict[str, Any]:
    return json.loads(store.read_bytes(f"{CHECKPOINTS}/{name}/state.json"))


def _optimizer_arrays(optimizer: Any) -> Dict[str, Any]:
    return {f"v{i:04d}": v.numpy() for i, v in enumerate(optimizer.variables)}


def save_checkpoint(store: ModelDirStore, model: Any, optimizer: Any, state: Mapping[str, Any]) -> str:
    """Write ``checkpoints/epoch-NNNN/`` atomically; returns its name."""
    import numpy as np

    name = checkpoint_name(int(state["epoch"]))
    tmp_rel = f"{CHECKPOINTS}/.tmp-{name}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="pixelmill-ckpt-") as tmp:
        model.save_weights(os.path.join(tmp, "model.weights.h5"))
        buf = io.BytesIO()
        np.savez(buf, **_optimizer_arrays(optimizer))
        store.upload(os.path.join(tmp, "model.weights.h5"), f"{tmp_rel}/model.weights.h5")
    store.write_bytes(f"{tmp_rel}/optimizer.npz", buf.getvalue())
    store.write_text(f"{tmp_rel}/state.json", json.dumps(state, indent=2, sort_keys=True, default=float))
    store.write_text(f"{tmp_rel}/{COMPLETE}", "")
    final = f"{CHECKPOINTS}/{name}"
    store.delete_dir(final)  # a folder from an earlier, crashed attempt at the same epoch
    store.move(tmp_rel, final)
    return name


def load_checkpoint(store: ModelDirStore, name: str, model: Any, optimizer: Any) -> Dict[str, Any]:
    """Restore weights and optimizer state from ``checkpoints/<name>``; returns its state dict."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="pixelmill-ckpt-") as tmp:
        local = os.path.join(tmp, "model.weights.h5")
        store.download(f"{CHECKPOINTS}/{name}/model.weights.h5", local)
        model.load_weights(local)
    arrays = np.load(io.BytesIO(store.read_bytes(f"{CHECKPOINTS}/{name}/optimizer.npz")))
    if len(arrays.files) != len(optimizer.variables):
        raise ValueError(f"checkpoint {name} has {len(arrays.files)} optimizer variables, the optimizer has "
                         f"{len(optimizer.variables)}: use --mode overwrite to start fresh")
    for i, v in enumerate(optimizer.variables):
        v.assign(arrays[f"v{i:04d}"])
    return read_checkpoint_state(store, name)


# --- outputs besides checkpoints ---------------------------------------------------

def history_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in HISTORY_COLUMNS})
    return buf.getvalue()


def curves_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in rows], marker="o", label=f"train {metric}")
        val = [r.get(f"val_{metric}") for r in rows]
        if any(v is not None for v in val):
            ax.plot(epochs, [float("nan") if v is None else v for v in val], marker="o", label=f"val {metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def stack_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist, key in (("tensorflow-cpu", "tensorflow"), ("tensorflow", "tensorflow"), ("keras", "keras"),
                      ("horovod", "horovod"), ("numpy", "numpy"), ("pyspark", "pyspark"),
                      ("petastorm", "petastorm")):
        if key in out:
            continue
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# --- the Horovod process ------------------------------------------------------------

def _setup_logging(rank: int, verbose: int) -> None:
    root = logging.getLogger("pipeline")
    if not any(getattr(h, "_pixelmill", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"))
        h._pixelmill = True  # type: ignore[attr-defined]
        root.addHandler(h)
        root.propagate = False
    root.setLevel(logging.INFO if rank == 0 and verbose > 0 else logging.WARNING)


class _Heartbeat:
    """Rank 0's liveness and progress signal to the driver: ``<model_dir>/_progress.json``.

    Horovod forwards process output to the driver in 64 KB chunks, too late for
    a watchdog, so rank 0 rewrites a small JSON file (atomically) at most every
    ``every_s`` seconds after steps complete, and at each epoch's end.
    """

    def __init__(self, store: Optional["ModelDirStore"], run_id: str, every_s: float = 2.0) -> None:
        self.store, self.run_id, self.every_s = store, run_id, every_s
        self.last = 0.0
        self.seq = 0
        self.epoch_lines: List[str] = []

    def beat(self, what: str, force: bool = False, epoch_line: Optional[str] = None) -> None:
        if self.store is None:
            return
        if epoch_line:
            self.epoch_lines = (self.epoch_lines + [epoch_line])[-50:]
        now = time.monotonic()
        if not (force or now - self.last >= self.every_s):
            return
        self.last = now
        self.seq += 1
        payload = {"run_id": self.run_id, "seq": self.seq, "what": what, "unix": time.time(),
                   "epoch_lines": self.epoch_lines}
        try:
            self.store.write_text(PROGRESS, json.dumps(payload))
        except Exception as e:  # noqa: BLE001 - progress must never kill training
            log.warning("could not write %s: %s", PROGRESS, e)


def _maybe_fault(fault: Optional[Mapping[str, Any]], rank: int, epoch: int, step: int) -> None:
    if not fault or fault["rank"] != rank or fault["epoch"] != epoch or fault["step"] != step:
        return
    log.warning("fault injection: %s rank %d at epoch %d step %d", fault["action"], rank, epoch, step)
    sys.stderr.flush()
    if fault["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # "hang": alive but silent, like a stuck collective or a frozen node
        time.sleep(3600)


def _make_optimizer(tc: Any, lr: float) -> Any:
    import keras

    if tc.optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True)
    else:
        opt = keras.optimizers.Adam(learning_rate=lr)
    return opt


def train_fn(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Entry point of each Horovod process (shipped by ``horovod.spark.run``).

    ``spec`` keys: ``data_uri``, ``model_dir``, ``cfg`` (``Config.model_dump``),
    ``manifest_sha256``, ``fingerprint``, optional ``fault``. Returns this
    rank's result; rank 0's includes the training summary.
    """
    rank_env = int(os.environ.get("HOROVOD_RANK", "0"))
    from pipeline.config import Config

    cfg = Config.model_validate(spec["cfg"])
    tc = cfg.train
    _setup_logging(rank_env, tc.verbose)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if tc.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(tc.intra_op_threads)
    if tc.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(tc.inter_op_threads)

    import horovod.tensorflow as hvd

    hvd.init()
    rank, size, local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
    try:
        return _train(spec, cfg, hvd, rank, size, local_rank)
    finally:
        sys.stderr.flush()


def _pin_devices(tc: Any, local_rank: int) -> Tuple[Any, bool]:
    import tensorflow as tf

    from pipeline.train.gpu import pin_gpu, select_gpu

    try:
        from horovod.spark.task import get_available_devices

        assigned = list(get_available_devices())
    except Exception:  # noqa: BLE001 - not under horovod.spark (e.g. horovodrun)
        assigned = []
    choice = select_gpu(assigned, local_rank=local_rank, num_visible=len(tf.config.list_physical_devices("GPU")),
                        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    pin_gpu(choice)
    mixed = bool(tc.mixed_precision and choice.index is not None)
    if tc.mixed_precision and not mixed:
        log.warning("train.mixed_precision is set but this process has no GPU: training in float32")
    if mixed:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    return choice, mixed


def _train(spec: Dict[str, Any], cfg: Any, hvd: Any, rank: int, size: int, local_rank: int) -> Dict[str, Any]:
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline import dataset
    from pipeline.train.models import build_model
    from pipeline.preprocess import ImageSpec

    t_start = time.time()
    tc = cfg.train
    data_uri, model_dir = spec["data_uri"], spec["model_dir"]
    fault = spec.get("fault")
    choice, mixed = _pin_devices(tc, local_rank)
    keras.utils.set_random_seed(tc.seed)  # same initial weights everywhere; broadcast makes it certain

    manifest = dataset.read_manifest(data_uri)
    image = ImageSpec.from_manifest(manifest)
    classes: Dict[str, int] = dict(manifest["classes"])
    num_classes = len(classes)
    val_rows_expected = int((manifest.get("splits") or {}).get("val", 0))

    model = build_model(tc.model, image.shape, num_classes, dropout=tc.dropout, weight_decay=tc.weight_decay,
                        width=tc.width, convs_per_block=tc.convs_per_block)
    optimizer = _make_optimizer(tc, tc.learning_rate)
    if mixed:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)

    # --- resume: rank 0 reads, everybody receives ------------------------------------
    store = ModelDirStore(model_dir)
    es = EarlyStopping(tc.early_stopping.metric, tc.early_stopping.patience, tc.early_stopping.min_delta)
    state: Dict[str, Any] = {"epoch": 0, "history": [], "early_stopping": es.to_dict(), "resumed_from": None,
                             "error": None}
    if rank == 0:
        try:
            store.mkdirs(CHECKPOINTS)
            found = find_resume_checkpoint(store)
            if found is not None:
                loaded = load_checkpoint(store, found[1], model, optimizer)
                if loaded.get("fingerprint") != spec["fingerprint"]:
                    raise ValueError(f"checkpoint {found[1]} in {model_dir} was trained on other data or another "
                                     "model: use --mode overwrite or another --model-dir")
                state.update(epoch=int(loaded["epoch"]), history=list(loaded["history"]),
                             early_stopping=loaded["early_stopping"], resumed_from=found[1])
                log.info("resuming from %s/%s/%s (epoch %d, step %d)", model_dir, CHECKPOINTS, found[1],
                         state["epoch"], int(optimizer.iterations.numpy()))
        except Exception as e:  # noqa: BLE001 - reported to every rank, then raised everywhere
            state["error"] = f"{type(e).__name__}: {e}"
    state = hvd.broadcast_object(state, root_rank=0, name="pixelmill_resume_state")
    if state["error"]:
        raise RuntimeError(f"resume failed: {state['error']}")
    for v in model.variables:
        v.assign(hvd.broadcast(v.value, root_rank=0))
    for v in optimizer.variables:
        v.assign(hvd.broadcast(v.value, root_rank=0))
    es = EarlyStopping.from_dict(state["early_stopping"])
    history: List[Dict[str, Any]] = state["history"]
    start_epoch = int(state["epoch"])

    # --- the step functions ---------------------------------------------------------------
    loss_obj = keras.losses.CategoricalCrossentropy(label_smoothing=tc.label_smoothing)

    @tf.function
    def train_step(x: Any, y: Any) -> Tuple[Any, Any, Any]:
        with tf.GradientTape() as tape:
            probs = model(x, training=True)
            loss = loss_obj(tf.one_hot(y, num_classes), probs)
            if model.losses:
                loss = loss + tf.add_n(model.losses)
            scaled = optimizer.scale_loss(loss) if mixed else loss
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(scaled, [v.value for v in model.trainable_variables])
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        n = tf.shape(y)[0]
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32),
                                                 tf.cast(y, tf.int32)), tf.float32))
        return loss * tf.cast(n, tf.float32), correct, n

    @tf.function
    def eval_step(x: Any, y: Any) -> Tuple[Any, Any, Any]:
        probs = tf.cast(model(x, training=False), tf.float32)
        losses = keras.losses.sparse_categorical_crossentropy(tf.cast(y, tf.int32), probs)
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32),
                                                 tf.cast(y, tf.int32)), tf.float32))
        return tf.reduce_sum(losses), correct, tf.shape(y)[0]

    def allreduce_sum(values: Sequence[float], name: str) -> List[float]:
        out = hvd.allreduce(tf.constant(list(values), tf.float64), op=hvd.Sum, name=name)
        return [float(v) for v in out.numpy()]

    # --- outputs (rank 0) -------------------------------------------------------------------
    tb_local = store.path("tensorboard") if store.uri.startswith("file://") else None
    tb_tmp = None
    writer = None
    if rank == 0:
        if tb_local is None:
            tb_tmp = tempfile.mkdtemp(prefix="pixelmill-tb-")
        os.makedirs(tb_local or tb_tmp, exist_ok=True)
        writer = tf.summary.create_file_writer(tb_local or tb_tmp)

    heartbeat = _Heartbeat(store if rank == 0 else None, str(spec.get("run_id", "")),
                           every_s=max(1.0, min(10.0, tc.step_timeout / 10)))
    heartbeat.beat("started", force=True)
    first_step_unix: Optional[float] = None
    global_batch = tc.batch_size * size
    epochs_run = 0
    train_seconds = 0.0
    train_images = 0

    try:
        if start_epoch < tc.epochs and not es.stopped:
            with contextlib.ExitStack() as stack:
                train = stack.enter_context(dataset.train_dataset(
                    data_uri, cfg, rank=rank, size=size, batch_size=tc.batch_size, seed=tc.seed + 1000 * start_epoch))
                val = (stack.enter_context(dataset.eval_dataset(data_uri, cfg, split="val", rank=rank, size=size,
                                                                batch_size=tc.batch_size))
                       if val_rows_expected > 0 else None)
                steps = int(train.steps_per_epoch)
                if steps < 1:
                    raise RuntimeError("the train split gives 0 steps per epoch: lower train.batch_size")
                warmup_steps = int(round(tc.warmup_epochs * steps))
                it = iter(train.dataset)
                if rank == 0:
                    log.info("training %s on %d process(es): %d steps/epoch x %d images/step, epochs %d..%d",
                             tc.model, size, steps, global_batch, start_epoch + 1, tc.epochs)
                for epoch in range(start_epoch + 1, tc.epochs + 1):
                    t_epoch = time.time()
                    sums: List[Any] = []
                    lr = tc.learning_rate
                    for step in range(1, steps + 1):
                        _maybe_fault(fault, rank, epoch, step)
                        gstep = int(optimizer.iterations.numpy())
                        lr = learning_rate_at(gstep, base_lr=tc.learning_rate, size=size, warmup_steps=warmup_steps,
                                              schedule=tc.lr_schedule, total_steps=steps * tc.epochs,
                                              min_ratio=tc.min_lr_ratio)
                        optimizer.learning_rate = lr
                        x, y = next(it)
                        sums.append(train_step(x, y))
                        if first_step_unix is None:
                            float(sums[-1][0])  # wait for the step to finish
                            first_step_unix = time.time()
                        heartbeat.beat(f"epoch={epoch} step={step}")
                    loss_sum = float(tf.add_n([s[0] for s in sums]))
                    correct = float(tf.add_n([s[1] for s in sums]))
                    count = float(sum(int(s[2]) for s in sums))
                    epoch_train_s = time.time() - t_epoch
                    loss_sum, correct, count = allreduce_sum([loss_sum, correct, count], f"train_totals_{epoch}")
                    # BatchNorm statistics saw different shards: average them so all ranks hold one model.
                    for v in model.non_trainable_variables:
                        v.assign(hvd.allreduce(v.value, op=hvd.Average, name=f"sync_{epoch}_{v.path}"))
                    row: Dict[str, Any] = {
                        "epoch": epoch, "train_loss": loss_sum / max(count, 1.0),
                        "train_accuracy": correct / max(count, 1.0), "val_loss": None, "val_accuracy": None,
                        "learning_rate": lr, "images_per_second": count / max(epoch_train_s, 1e-9),
                    }
                    if epoch > start_epoch + 1 or start_epoch + 1 == tc.epochs:
                        train_seconds += epoch_train_s
                        train_images += int(count)
                    if val is not None:
                        v_loss, v_correct, v_count = 0.0, 0.0, 0.0
                        for x, y in val.dataset:
                            a, b, c = eval_step(x, y)
                            v_loss, v_correct, v_count = v_loss + float(a), v_correct + float(b), v_count + int(c)
                            heartbeat.beat(f"epoch={epoch} validating")
                        v_loss, v_correct, v_count = allreduce_sum([v_loss, v_correct, v_count], f"val_totals_{epoch}")
                        if int(v_count) != val_rows_expected:
                            raise RuntimeError(f"validation saw {int(v_count)} rows, the manifest says the val split "
                                               f"has {val_rows_expected}: the dataset layer broke exactly-once")
                        row["val_loss"], row["val_accuracy"] = v_loss / v_count, v_correct / v_count
                    row["epoch_seconds"] = time.time() - t_epoch
                    history.append(row)
                    epochs_run += 1
                    monitored = row.get(es.metric)
                    if monitored is None:  # no val split: watch the train metric instead
                        monitored = row[es.metric.replace("val_", "train_")]
                    es.update(epoch, float(monitored))
                    line = (f"epoch {epoch}/{tc.epochs}  loss {row['train_loss']:.4f}  "
                            f"acc {row['train_accuracy']:.4f}  val_loss {_fmt(row['val_loss'])}  "
                            f"val_acc {_fmt(row['val_accuracy'])}  lr {lr:.2e}  "
                            f"{row['images_per_second']:.0f} img/s  {row['epoch_seconds']:.1f}s")
                    if rank == 0:
                        log.info("%s", line)
                        _write_epoch_outputs(store, model, optimizer, writer, tb_tmp, history, es, epoch,
                                             spec, tc)
                    heartbeat.beat(f"epoch={epoch} done", force=True, epoch_line=line)
                    if es.stopped:
                        if rank == 0:
                            log.info("early stopping: %s has not improved for %d epochs (best %.4f at epoch %d)",
                                     es.metric, es.patience + 1, es.best, es.best_epoch)
                        break
        # All ranks wait for rank 0's files before anyone reports success.
        hvd.allreduce(tf.constant(0.0), op=hvd.Sum, name="pixelmill_epochs_done")
        trained_digest = weights_digest([v.numpy() for v in model.variables])
        result: Dict[str, Any] = {"rank": rank, "size": size, "weights_sha256": trained_digest,
                                  "gpu": choice.address, "gpu_source": choice.source}
        if rank == 0:
            if not history:
                raise RuntimeError("no epoch was trained and no checkpoint exists: check train.epochs")
            result.update(_export(store, model, spec, cfg, manifest, classes, image, history, es))
            result.update(
                resumed_from=state["resumed_from"], start_epoch=start_epoch, epochs_run=epochs_run,
                first_step_unix=first_step_unix, process_start_unix=t_start,
                images_per_second=(train_images / train_seconds) if train_seconds > 0 else None,
            )
        hvd.allreduce(tf.constant(0.0), op=hvd.Sum, name="pixelmill_export_done")
        return result
    finally:
        if writer is not None:
            writer.close()
        if tb_tmp:
            shutil.rmtree(tb_tmp, ignore_errors=True)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _write_epoch_outputs(store: ModelDirStore, model: Any, optimizer: Any, writer: Any, tb_tmp: Optional[str],
                         history: List[Dict[str, Any]], es: EarlyStopping, epoch: int, spec: Mapping[str, Any],
                         tc: Any) -> None:
    import tensorflow as tf

    row = history[-1]
    with writer.as_default(step=epoch):
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second"):
            if row.get(k) is not None:
                tf.summary.scalar(k, row[k])
    writer.flush()
    if tb_tmp:
        store.upload_tree(tb_tmp, "tensorboard")
    state = {
        "epoch": epoch, "global_step": int(optimizer.iterations.numpy()), "history": history,
        "early_stopping": es.to_dict(), "fingerprint": spec["fingerprint"],
        "finished": bool(es.stopped or epoch >= tc.epochs), "target_epochs": tc.epochs,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    name = save_checkpoint(store, model, optimizer, state)
    keep = [es.best_epoch] if tc.restore_best and es.best_epoch else []
    for old in checkpoints_to_delete(store.listdir(CHECKPOINTS), keep_last=tc.keep_checkpoints, keep_epochs=keep):
        store.delete_dir(f"{CHECKPOINTS}/{old}")
    store.write_text("history.csv", history_csv(history))
    store.write_bytes("training_curves.png", curves_png(history))
    log.info("checkpoint %s/%s/%s written", store.uri, CHECKPOINTS, name)


def _export(store: ModelDirStore, model: Any, spec: Mapping[str, Any], cfg: Any, manifest: Mapping[str, Any],
            classes: Mapping[str, int], image: Any, history: List[Dict[str, Any]],
            es: EarlyStopping) -> Dict[str, Any]:
    """Write ``model/model.keras`` and then ``model.json`` (rank 0)."""
    from pipeline.preprocess import Normalization

    tc = cfg.train
    last = history[-1]
    chosen = last
    if tc.restore_best and es.best_epoch and es.best_epoch != last["epoch"]:
        name = checkpoint_name(es.best_epoch)
        if store.exists(f"{CHECKPOINTS}/{name}/{COMPLETE}"):
            with tempfile.TemporaryDirectory(prefix="pixelmill-best-") as tmp:
                store.download(f"{CHECKPOINTS}/{name}/model.weights.h5", os.path.join(tmp, "w.weights.h5"))
                model.load_weights(os.path.join(tmp, "w.weights.h5"))
            chosen = next(r for r in history if r["epoch"] == es.best_epoch)
            log.info("exporting the best epoch %d (%s %.4f)", es.best_epoch, es.metric, es.best)
        else:
            log.warning("best checkpoint %s is gone: exporting the last epoch", name)
    with tempfile.TemporaryDirectory(prefix="pixelmill-export-") as tmp:
        local = os.path.join(tmp, "model.keras")
        model.save(local)
        with open(local, "rb") as f:
            blob = f.read()
    model_id = hashlib.sha256(blob).hexdigest()[:16]
    store.write_bytes("model/model.keras", blob)
    norm = Normalization.from_mode(cfg.loader.normalize, manifest, image.channels)
    metrics = {"train_loss": chosen["train_loss"], "train_accuracy": chosen["train_accuracy"]}
    if chosen.get("val_loss") is not None:
        metrics.update(val_loss=chosen["val_loss"], val_accuracy=chosen["val_accuracy"])
    info = {
        "model_id": model_id,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": dict(classes),
        "image": dict(manifest["image"]),
        "normalization": norm.to_dict(),
        "ingest_manifest_sha256": spec["manifest_sha256"],
        "epochs_completed": int(last["epoch"]),
        "exported_epoch": int(chosen["epoch"]),
        "stopped_early": bool(es.stopped),
        "metrics": metrics,
        "stack": stack_versions(),
        "config": {"train": cfg.train.model_dump(mode="json"), "loader": cfg.loader.model_dump(mode="json")},
        "data_uri": spec["data_uri"],
        "num_proc": int(spec.get("num_proc", 0)) or None,
    }
    store.write_text("model.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    log.info("exported %s/model/model.keras (model_id %s, epoch %d)", store.uri, model_id, chosen["epoch"])
    return {"model_id": model_id, "metrics": metrics, "epochs_completed": int(last["epoch"]),
            "exported_epoch": int(chosen["epoch"]), "stopped_early": bool(es.stopped),
            "best_epoch": int(es.best_epoch), "history": history}

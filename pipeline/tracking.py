"""MLflow tracking of a training job and its scoring, off the critical path.

One MLflow run per training job. The driver picks the store (:func:`resolve_store`:
``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store beside the model
dir, ``<model_dir>/../mlruns/mlflow.db`` with artifacts in ``<model_dir>/../mlruns/artifacts``)
and creates the run (:func:`start_training_run`); its :class:`RunRef` travels to the Horovod
processes in the launch spec, and only rank 0 logs to it (:func:`for_rank`): the resolved
config flattened, the stack versions and the data's manifest as params, one metric row per
epoch, and at the end the curves, the model card, ``model.keras`` and the SavedModel as
artifacts. The run id goes into ``model.json`` (``mlflow``), so scoring logs its metrics and
confusion matrix to the same run (:func:`log_scoring`).

Every call goes through an :class:`AsyncLogger`: a bounded queue drained by one daemon thread.
Enqueueing never blocks (a full queue drops the call), the first failure (a server that is
down, a store that cannot be written) is logged once as a warning and turns the logger off,
and closing waits at most ``tracking.flush_timeout_s``. A server that is unreachable when the
run would be created (checked with one ``/health`` request) is one warning and no tracking.
Tracking therefore never fails a job, and a dead server never slows one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

from pipeline.fs import local_path, parent_and_name

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import Config, TrackingConfig
    from pipeline.fs import FileSystem

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
#: The local store's folder, next to the model dir.
LOCAL_STORE_DIR = "mlruns"
LOCAL_DB = "mlflow.db"
#: MLflow's limits on one ``log_batch`` request.
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000


@dataclasses.dataclass(frozen=True)
class RunRef:
    """Where a training job's MLflow run is: what the spec and the model card carry."""

    tracking_uri: str
    run_id: str
    experiment_id: str

    def to_dict(self) -> Dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> Optional["RunRef"]:
        if not d or not d.get("run_id") or not d.get("tracking_uri"):
            return None
        return cls(str(d["tracking_uri"]), str(d["run_id"]), str(d.get("experiment_id", "")))


# --- where to log ---------------------------------------------------------------------------

def resolve_store(tc: "TrackingConfig", model_dir: str) -> Tuple[Optional[str], Optional[str]]:
    """``(tracking URI, artifact location for a new experiment)``; ``(None, None)`` when there is none.

    The local default needs a local model dir (a SQLite file cannot live on HDFS or S3).
    """
    uri = tc.uri or os.environ.get(ENV_URI) or None
    if uri:
        return uri, None
    local = local_path(model_dir)
    if local is None:
        log.warning("MLflow tracking is off: the model dir %s is not local, so there is no place for a local "
                    "store; set tracking.uri or %s to a tracking server", model_dir, ENV_URI)
        return None, None
    root = os.path.join(os.path.dirname(os.path.abspath(local.rstrip("/"))), LOCAL_STORE_DIR)
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, LOCAL_DB)}", "file://" + os.path.join(root, "artifacts")


def server_problem(uri: str, timeout_s: float = 3.0) -> Optional[str]:
    """For an ``http(s)://`` tracking URI: why its ``/health`` does not answer, else None (other URIs: None)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:  # noqa: S310 - configured URI
            return None if r.status == 200 else f"/health answered HTTP {r.status}"
    except Exception as e:  # noqa: BLE001 - any failure means: do not track
        return f"{type(e).__name__}: {e}"


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _call_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError when it has not returned within ``timeout_s``."""
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name="pixelmill-mlflow-start", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def start_training_run(cfg: "Config", model_dir: str, *, run_name: str,
                       tags: Optional[Mapping[str, str]] = None) -> Optional[RunRef]:
    """Create the training job's MLflow run on the driver (bounded wait); None, with one warning, on any failure."""
    tc = cfg.tracking
    if not tc.enabled:
        return None
    uri, artifact_location = resolve_store(tc, model_dir)
    if uri is None:
        return None
    problem = server_problem(uri)
    if problem:
        log.warning("MLflow tracking is off for this run: the tracking server %s is not reachable (%s); "
                    "training goes on", uri, problem)
        return None

    def create() -> RunRef:
        client = _client(uri)
        exp = client.get_experiment_by_name(tc.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(
            tc.experiment, artifact_location=artifact_location)
        run = client.create_run(exp_id, run_name=run_name, tags={"pixelmill.model_dir": model_dir, **(tags or {})})
        return RunRef(uri, run.info.run_id, str(exp_id))

    try:
        ref = _call_with_timeout(create, timeout_s=max(5.0, 3.0 * tc.request_timeout_s))
    except Exception as e:  # noqa: BLE001 - tracking never fails a job
        log.warning("MLflow tracking is off for this run: creating a run in %s failed (%s: %s); training goes on",
                    uri, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
        return None
    log.info("MLflow run %s in %s (experiment %r)", ref.run_id, uri, tc.experiment)
    return ref


def end_run(ref: Optional[RunRef], status: str, timeout_s: float = 10.0) -> None:
    """Mark the run ``FINISHED`` / ``FAILED`` (driver side, e.g. after a failed launch); never raises."""
    if ref is None:
        return
    try:
        _call_with_timeout(lambda: _client(ref.tracking_uri).set_terminated(ref.run_id, status=status), timeout_s)
    except Exception as e:  # noqa: BLE001
        log.warning("MLflow: could not mark run %s %s (%s)", ref.run_id, status, e)


# --- the background logger ------------------------------------------------------------------

class AsyncLogger:
    """MLflow calls for one run, made by one daemon thread from a bounded queue.

    ``submit`` never blocks: a full queue drops the call. The first failing call logs one
    warning and turns the logger off (the rest are dropped). ``close`` waits at most
    ``flush_timeout_s`` for what is queued, then leaves the thread behind (it is a daemon).
    """

    def __init__(self, ref: RunRef, *, queue_size: int = 1000, flush_timeout_s: float = 60.0,
                 request_timeout_s: int = 10) -> None:
        self.ref, self.flush_timeout_s = ref, flush_timeout_s
        self.failed: Optional[str] = None
        self.dropped = 0
        self._q: "queue.Queue[Any]" = queue.Queue(maxsize=queue_size)
        self._tmp = tempfile.mkdtemp(prefix="pixelmill-mlflow-")
        self._closed = False
        # The logging thread's requests: few retries, bounded time (read by MLflow on every request).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout_s))
        self._thread = threading.Thread(target=self._drain, name="pixelmill-mlflow", daemon=True)
        self._thread.start()

    # producer side
    def submit(self, fn: Callable[[Any], None], what: str) -> None:
        """Queue ``fn(client)``; dropped when the logger failed, is closed, or the queue is full."""
        if self.failed or self._closed:
            return
        try:
            self._q.put_nowait((fn, what))
        except queue.Full:
            if self.dropped == 0:
                log.warning("MLflow logging is behind (%d calls queued): dropping %s and later calls until it "
                            "catches up", self._q.maxsize, what)
            self.dropped += 1

    # MLflow is imported by the logging thread only (importing it takes a second): the callers
    # queue plain values, the thread builds MLflow's entities from them.
    def params(self, params: Mapping[str, Any]) -> None:
        items = [(mlflow_key(k), str(v)[:_MAX_PARAM_CHARS]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.submit(lambda c, chunk=items[i:i + _MAX_PARAMS_PER_BATCH]: c.log_batch(
                self.ref.run_id, params=[_entity("Param", k, v) for k, v in chunk]), "params")

    def metrics(self, values: Mapping[str, Optional[float]], step: int) -> None:
        stamp = int(time.time() * 1000)
        rows = [(mlflow_key(k), float(v)) for k, v in sorted(values.items()) if v is not None]
        if rows:
            self.submit(lambda c: c.log_batch(self.ref.run_id, metrics=[
                _entity("Metric", k, v, stamp, int(step)) for k, v in rows]), f"metrics of step {step}")

    def tags(self, tags: Mapping[str, Any]) -> None:
        rows = [(k, str(v)) for k, v in sorted(tags.items())]
        self.submit(lambda c: c.log_batch(self.ref.run_id, tags=[_entity("RunTag", k, v) for k, v in rows]), "tags")

    def artifact(self, fs: "FileSystem", uri: str, artifact_path: Optional[str] = None) -> None:
        """Log the file or folder ``uri`` (any :mod:`pipeline.fs` scheme) when the thread gets to it."""
        def log_it(c: Any) -> None:
            path = self._local_copy(fs, uri)
            if os.path.isdir(path):
                c.log_artifacts(self.ref.run_id, path, artifact_path=artifact_path)
            else:
                c.log_artifact(self.ref.run_id, path, artifact_path=artifact_path)
        self.submit(log_it, f"artifact {uri}")

    def terminate(self, status: str) -> None:
        self.submit(lambda c: c.set_terminated(self.ref.run_id, status=status), f"status {status}")

    def close(self) -> None:
        """Wait up to ``flush_timeout_s`` for the queued calls; never raises."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.flush_timeout_s
        try:
            self._q.put(None, timeout=max(0.0, self.flush_timeout_s))
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("MLflow logging did not finish within tracking.flush_timeout_s=%gs: leaving %d call(s) "
                        "behind", self.flush_timeout_s, self._q.qsize())
        else:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # consumer side
    def _drain(self) -> None:
        client = None
        while True:
            item = self._q.get()
            if item is None:
                return
            if self.failed:
                continue
            fn, what = item
            try:
                client = client or _client(self.ref.tracking_uri)
                fn(client)
            except Exception as e:  # noqa: BLE001 - tracking never fails the job: one warning, then off
                self.failed = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
                log.warning("MLflow logging to %s failed (%s while logging %s): no more tracking for this job, "
                            "which goes on", self.ref.tracking_uri, self.failed, what)

    def _local_copy(self, fs: "FileSystem", uri: str) -> str:
        local = local_path(uri)
        if local is not None:
            return local
        dest = os.path.join(self._tmp, parent_and_name(uri)[1])
        if fs.is_dir(uri):
            _download_tree(fs, uri, dest)
        else:
            fs.download(uri, dest)
        return dest


def _entity(name: str, *args: Any) -> Any:
    import mlflow.entities

    return getattr(mlflow.entities, name)(*args)


def _download_tree(fs: "FileSystem", uri: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for e in fs.entries(uri):
        if e.is_dir:
            _download_tree(fs, e.uri, os.path.join(dest, e.name))
        else:
            fs.download(e.uri, os.path.join(dest, e.name))


# --- what training and scoring log ------------------------------------------------------------

def mlflow_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in metric and param keys replaced by ``_``.

    >>> mlflow_key("recall.t-shirt/top (old)")
    'recall.t-shirt/top _old_'
    """
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:250]


def flatten(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": 3}`` (lists and empty dicts stay values)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Nothing:
    """Rank != 0, or no run: every call does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class TrainingTracker:
    """Rank 0's logging of one training job (see :func:`for_rank`)."""

    def __init__(self, logger: AsyncLogger) -> None:
        self.logger = logger

    def epoch(self, row: Mapping[str, Any]) -> None:
        """One metric row per epoch, ``step`` = the epoch number."""
        self.logger.metrics({k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))},
                            step=int(row["epoch"]))

    def outputs(self, fs: "FileSystem", model_dir: str) -> None:
        """The exported model (``model/``: model.keras + saved_model), its card, history and curves."""
        from pipeline.contracts import CURVES_PNG, HISTORY_CSV, MODEL_CARD, MODEL_SUBDIR
        from pipeline.fs import join

        self.logger.artifact(fs, join(model_dir, MODEL_SUBDIR), MODEL_SUBDIR)
        for name in (MODEL_CARD, HISTORY_CSV, CURVES_PNG):
            self.logger.artifact(fs, join(model_dir, name))


@contextlib.contextmanager
def for_rank(spec: Mapping[str, Any], rank: int, cfg: "Config") -> Iterator[Any]:
    """Rank 0's :class:`TrainingTracker` for the spec's run (params logged at once); a no-op elsewhere.

    On leaving, the run is marked FINISHED, or FAILED when an exception is passing through.
    """
    ref = RunRef.from_dict(spec.get("tracking"))
    if rank != 0 or ref is None:
        yield _Nothing()
        return
    tc = cfg.tracking
    logger = AsyncLogger(ref, queue_size=tc.queue_size, flush_timeout_s=tc.flush_timeout_s,
                         request_timeout_s=tc.request_timeout_s)
    tracker = TrainingTracker(logger)
    status = "FAILED"
    try:
        logger.params(training_params(spec, cfg))
        yield tracker
        status = "FINISHED"
    finally:
        logger.terminate(status)
        logger.close()


def training_params(spec: Mapping[str, Any], cfg: "Config") -> Dict[str, Any]:
    """The resolved config flattened, the stack versions, the data snapshot and the launch's shape."""
    from pipeline.train.outputs import stack_versions

    params = flatten(cfg.to_dict())
    params.update({f"stack.{k}": v for k, v in stack_versions().items()})
    params.update({"data.uri": (spec.get("data") or {}).get("uri", spec.get("data_uri")),
                   "data.version": (spec.get("data") or {}).get("version"), "data.ingest_manifest_sha256": spec.get("manifest_sha256"),
                   "model_dir": spec.get("model_dir"), "num_proc": spec.get("num_proc")})
    balance = spec.get("class_balance") or {}
    if balance.get("weights"):
        params.update({f"class_weight.{k}": v for k, v in balance["weights"].items()})
    return params


def log_scoring(card: Mapping[str, Any], cfg: "Config", fs: "FileSystem", output_uri: str, *, split: str,
                metrics: Optional[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    """Log a scoring run's metrics and confusion matrix to the training's run (``model.json``'s ``mlflow``)."""
    from pipeline.contracts import CONFUSION_PNG, METRICS_FILE
    from pipeline.fs import join

    ref = RunRef.from_dict(card.get("mlflow"))
    if ref is None or not cfg.tracking.enabled:
        return
    tc = cfg.tracking
    if server_problem(ref.tracking_uri):
        log.warning("MLflow: the tracking server %s of run %s is not reachable: scoring is not logged",
                    ref.tracking_uri, ref.run_id)
        return
    logger = AsyncLogger(ref, queue_size=tc.queue_size, flush_timeout_s=tc.flush_timeout_s,
                         request_timeout_s=tc.request_timeout_s)
    try:
        values = {"rows": summary.get("rows"), "rejected": summary.get("rejected")}
        if metrics:
            values.update({k: metrics.get(k) for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")})
            values.update({f"recall.{c}": m.get("recall") for c, m in (metrics.get("per_class") or {}).items()})
        logger.metrics({f"score.{split}.{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=0)
        logger.tags({f"pixelmill.scores.{split}": output_uri})
        for name in (METRICS_FILE, CONFUSION_PNG):
            if fs.exists(join(output_uri, name)):
                logger.artifact(fs, join(output_uri, name), f"scores/{split}")
    finally:
        logger.close()

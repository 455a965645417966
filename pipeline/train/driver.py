"""Driver side of training: validate, launch Horovod on Spark, watch it, report.

``run(spark, cfg, *, data_uri, model_dir, mode)`` checks everything that can be checked
before any executor works (a committed ingest output with train rows, enough row groups
and task slots for ``train.num_proc``, a model-dir that matches the data), then runs
:func:`pipeline.train.worker.train_fn` in ``train.num_proc`` Spark tasks with
``horovod.spark.run`` (Gloo).

``horovod.spark.run`` runs watched by :class:`pipeline.train.progress.Watchdog`: rank 0
rewrites ``<model_dir>/_progress.json`` while steps complete (the driver logs its epoch
lines as they come). No progress within ``train.start_timeout`` + ``train.step_timeout`` of
the launch, or for ``train.step_timeout`` later, and the watchdog cancels the Spark job
group and the run fails with one line naming the key to raise. A killed Horovod process
makes its peers' collectives fail at once (Gloo sees the closed socket;
``HOROVOD_GLOO_TIMEOUT_SECONDS`` bounds the wait when a machine vanishes without closing
sockets), so the job fails fast and a rerun with the same ``--model-dir`` resumes from the
last checkpoint.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence

from pipeline import faults, tracking
from pipeline.contracts import (MODEL_CARD, manifest_sha256, model_file_uri, read_manifest, read_model_card,
                                resolve_ingest)
from pipeline.errors import ConfigError, DataError, InvariantError, TrainingError
from pipeline.fs import filesystem, join, to_uri
from pipeline.train import checkpoints, class_weights
from pipeline.train.models import for_model, input_size_problem
from pipeline.train.progress import ProgressReader, Watchdog

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

    from pipeline.config import Config
    from pipeline.contracts import IngestManifest
    from pipeline.fs import FileSystem

log = logging.getLogger(__name__)

MODES = ("resume", "overwrite")


class _OutputTap:
    """A file-like sink for Horovod's forwarded stdout/stderr: logs lines, keeps the tail for errors.

    Horovod forwards output in 64 KB chunks, so these lines arrive late; live
    progress comes from :class:`pipeline.train.progress.ProgressReader`.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._lock = threading.Lock()
        self.tail: List[str] = []

    def write(self, text: Any) -> int:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        with self._lock:
            self._buf += text
            *lines, self._buf = self._buf.split("\n")
            for line in lines:
                line = line.rstrip("\r")
                if line.strip():
                    self.tail = (self.tail + [line])[-40:]
                    log.debug("%s", line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def validate_inputs(spark: "SparkSession", cfg: "Config", *, data_uri: str, model_dir: str,
                    mode: str, data_root: Optional[str] = None) -> "IngestManifest":
    """Everything checked before launching; returns the ingest manifest.

    :func:`pipeline.contracts.read_manifest` checks that ``data_uri`` is a committed ingest
    output; the checks here are training's own: classes, train rows, row groups, one global batch.
    """
    from pipeline.spark import is_local_master, wait_for_task_slots

    tc = cfg.train
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    if data_uri.rstrip("/") == model_dir.rstrip("/"):
        raise ConfigError("--model-dir must differ from --data")
    slots = wait_for_task_slots(spark, tc.num_proc, timeout_s=tc.start_timeout)
    if tc.num_proc > slots:
        waited = "" if is_local_master(spark.sparkContext.master) else f" within train.start_timeout={tc.start_timeout}s"
        raise ConfigError(f"train.num_proc={tc.num_proc} needs {tc.num_proc} concurrent Spark task slots but the "
                          f"cluster offers {slots}{waited}: lower train.num_proc (--num-proc) or add executors/cores")
    manifest = read_manifest(data_root or data_uri, spark=spark)
    train_rows, groups = int(manifest.splits.get("train", 0)), int(manifest.row_groups.get("train", 0))
    if len(manifest.classes) < 2:
        raise DataError(f"--data {data_uri} has {len(manifest.classes)} class(es): training needs at least 2 "
                        "labelled classes")
    if train_rows < 1:
        raise DataError(f"--data {data_uri} has no rows in the train split: check ingest.split_fractions")
    if groups and groups < tc.num_proc:
        raise DataError(f"the train split has {groups} row group(s), fewer than train.num_proc={tc.num_proc}: "
                        f"lower train.num_proc or re-run ingest with ingest.max_train_procs >= {tc.num_proc}")
    if train_rows < tc.batch_size * tc.num_proc:
        raise DataError(f"the train split has {train_rows} rows, fewer than one global batch "
                        f"(train.batch_size={tc.batch_size} x train.num_proc={tc.num_proc}): lower train.batch_size")
    problem = input_size_problem(tc.model, int(manifest.image.height), int(manifest.image.width))
    if problem:
        raise ConfigError(problem)
    from pipeline.imaging.stored import ImageSpec
    from pipeline.train.finetune import check_unfreeze_from

    check_unfreeze_from(tc, ImageSpec.from_manifest(manifest).shape, len(manifest.classes))
    if int(manifest.splits.get("val", 0)) < 1:
        log.warning("--data %s has no val split: early stopping watches the train metric instead", data_uri)
    return manifest


def _model_dir_fs(model_dir: str) -> "FileSystem":
    """The model-dir through pyarrow: what the Horovod processes (no JVM) and the watchdog thread use."""
    try:
        return filesystem(model_dir)
    except ConfigError as e:
        raise ConfigError(f"--model-dir cannot be opened by the training processes, which have no JVM: {e}") from None


def fingerprint(cfg: "Config", manifest: Mapping[str, Any], manifest_sha: str, *,
                weights: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """What a checkpoint must match to be resumed (data, classes, input, model, schedule, loss weights).

    The fine-tuning schedule's keys and the class weights are in it only when set, so the
    checkpoints of runs without them keep the fingerprint they had.
    """
    from pipeline.train.finetune import Schedule

    fp = {"ingest_manifest_sha256": manifest_sha, "classes": dict(manifest["classes"]),
          "image": dict(manifest["image"]), "model": cfg.train.model, "optimizer": cfg.train.optimizer,
          "mixed_precision": cfg.train.mixed_precision, **Schedule.from_config(cfg.train).fingerprint()}
    if weights is not None:
        fp["class_weights"] = [float(w) for w in weights]
    return fp


def _existing_result(fs: "FileSystem", model_dir: str, cfg: "Config",
                     fp: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """When ``model_dir`` already holds a finished run of this config, its summary; else None.

    Also refuses to resume a model-dir trained on other data or another model.
    """
    found = checkpoints.find_latest(fs, model_dir)
    if found is None:
        return None
    state = checkpoints.read_state(fs, model_dir, found[1])
    stored = dict(state.get("fingerprint") or {})
    if stored != dict(fp) and {**stored, "ingest_manifest_sha256": None} == {**fp, "ingest_manifest_sha256": None}:
        raise ConfigError(f"--model-dir {model_dir} holds checkpoints of another version of --data (a newer ingest or "
                          "append): pass --mode overwrite to retrain on it, or warm-start a new --model-dir with "
                          f"train.init_weights={model_dir}")
    if stored != dict(fp):
        raise ConfigError(f"--model-dir {model_dir} holds checkpoints of another dataset, model or train.class_weight: "
                          "pass --mode overwrite to start fresh, or choose another --model-dir")
    stopped = bool(state["early_stopping"].get("stopped"))
    if not (stopped or int(state["epoch"]) >= cfg.train.epochs) or not fs.exists(join(model_dir, MODEL_CARD)):
        log.info("resuming: last complete checkpoint is %s (epoch %d of %d)", found[1], state["epoch"],
                 cfg.train.epochs)
        return None
    card = read_model_card(fs, model_dir)
    log.info("%s already holds a finished run (%d epochs%s): nothing to do (pass --mode overwrite to retrain)",
             model_dir, state["epoch"], ", stopped early" if stopped else "")
    return {"model_dir": model_dir, "model_uri": model_file_uri(model_dir),
            "model_id": card.model_id, "epochs_completed": card.epochs_completed,
            "exported_epoch": card.get("exported_epoch"), "stopped_early": card.get("stopped_early", False),
            "metrics": card.metrics, "resumed_from": found[1], "epochs_run": 0, "skipped": True,
            "num_proc": cfg.train.num_proc}


def check_init_weights(cfg: "Config", manifest: "IngestManifest") -> Optional[Dict[str, Any]]:
    """Resolve ``train.init_weights`` and trial-load it into the model training builds (before launch).

    Returns the plain-data source for the Horovod processes and the model card, or None.
    """
    tc = cfg.train
    if not tc.init_weights:
        return None
    from pipeline.imaging.stored import ImageSpec
    from pipeline.train.init_weights import resolve
    from pipeline.train.models import build_model

    model = build_model(tc.model, ImageSpec.from_manifest(manifest).shape, len(manifest.classes), dropout=tc.dropout,
                        weight_decay=tc.weight_decay, width=tc.width, convs_per_block=tc.convs_per_block)
    source = resolve(tc.init_weights, model, manifest.classes, model_name=tc.model)
    log.info("train.init_weights: %s weights (%s) from %s", source.kind, source.loaded, source.uri)
    return source.to_card()


def horovod_env(cfg: "Config") -> Dict[str, str]:
    """Environment of the Horovod processes: timeouts that turn a dead peer into an error."""
    tc = cfg.train
    env = {
        # A Gloo collective waiting longer than this for a peer fails instead of hanging.
        "HOROVOD_GLOO_TIMEOUT_SECONDS": str(tc.step_timeout),
        # A rank that stops submitting tensors (stuck, not dead) shuts Horovod down.
        "HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(5, min(60, tc.step_timeout // 2))),
        "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(tc.step_timeout),
        # Each cycle the ranks negotiate which tensors are ready (docs/train.md "Performance").
        "HOROVOD_CYCLE_TIME": f"{tc.cycle_time_ms:g}",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
    }
    if tc.fusion_threshold_mb is not None:  # tensors fused into one allreduce up to this many bytes
        env["HOROVOD_FUSION_THRESHOLD"] = str(int(tc.fusion_threshold_mb * 1024 * 1024))
    if tc.intra_op_threads:
        env["OMP_NUM_THREADS"] = str(tc.intra_op_threads)
    return env


def _explain_failure(err: BaseException, tap: _OutputTap, cfg: "Config", model_dir: str) -> str:
    text = str(err)
    if "Timed out waiting for" in text:
        return (f"Horovod processes did not all start within train.start_timeout={cfg.train.start_timeout}s: "
                f"free {cfg.train.num_proc} task slots or raise train.start_timeout")
    code = re.search(r"Exit code: (-?\d+)", text)
    name = re.search(r"Process name: (\S+)", text)
    if not code:
        first = (text.strip().splitlines() or [type(err).__name__])[0][:300]
        return (f"training failed: {type(err).__name__}: {first}. Rerun with the same --model-dir {model_dir} "
                "to resume from the last checkpoint")
    c = int(code.group(1))
    sig = -c if c < 0 else (c - 128 if 128 < c < 160 else 0)  # Python's -N or the shell's 128+N
    why = f" (exit code {c}{', killed by signal ' + str(sig) if sig else ''})"
    who = f"Horovod process {name.group(1)}" if name else "a Horovod process"
    hint = next((line for line in reversed(tap.tail) if re.search(r"Error\b|error:", line)), "")
    hint = f"; last error: {hint.strip()[:300]}" if hint else ""
    return (f"training failed: {who} exited{why}{hint}. Rerun with the same --model-dir {model_dir} "
            "to resume from the last checkpoint")


def run(spark: "SparkSession", cfg: "Config", *, data_uri: str, model_dir: str, mode: str = "resume",
        data_version: Optional[int] = None) -> Dict[str, Any]:
    """Train with Horovod on Spark; returns a summary dict (epochs, final metrics).

    Parameters
    ----------
    data_uri:
        A committed ingest output.
    model_dir:
        Where checkpoints, history, TensorBoard logs and the exported model go.
    mode:
        ``resume`` continues from the last complete checkpoint (a finished run
        is returned as is); ``overwrite`` deletes ``model_dir`` and starts fresh.
    data_version:
        The committed version of ``data_uri`` to train on (default: the newest).
    """
    from pipeline.spark import assert_on_driver

    assert_on_driver()
    t0 = time.time()
    cfg = for_model(cfg)
    data_uri, model_dir = to_uri(data_uri), to_uri(model_dir)
    if data_uri.rstrip("/") == model_dir.rstrip("/"):
        raise ConfigError("--model-dir must differ from --data")
    data = resolve_ingest(data_uri, spark=spark, version=data_version)  # once: the whole run reads this version
    manifest = validate_inputs(spark, cfg, data_uri=data_uri, model_dir=model_dir, mode=mode, data_root=data.root)
    balance = class_weights.for_training(cfg, data.root, manifest)
    fs = _model_dir_fs(model_dir)
    manifest_sha = manifest_sha256(data.root, filesystem(data_uri, spark))
    fp = fingerprint(cfg, manifest, manifest_sha, weights=balance.weights)
    fresh = mode == "overwrite" or not fs.exists(model_dir) or checkpoints.find_latest(fs, model_dir) is None
    init = check_init_weights(cfg, manifest) if fresh else None
    if mode == "overwrite" and fs.exists(model_dir):
        log.warning("--mode overwrite: deleting %s", model_dir)
        fs.delete(model_dir)
    elif mode == "resume":
        done = _existing_result(fs, model_dir, cfg, fp)
        if done is not None:
            done["timings"] = {"total_s": round(time.time() - t0, 3)}
            return done
    fs.mkdirs(model_dir)
    spec = {"run_id": uuid.uuid4().hex, "data_uri": data.root, "model_dir": model_dir, "cfg": cfg.to_dict(),
            "data": {**data.describe(), "manifest_sha256": manifest_sha},
            "manifest_sha256": manifest_sha, "fingerprint": fp, "fault": faults.armed(),
            "num_proc": cfg.train.num_proc, "init_weights": init,
            "class_weights": None if balance.weights is None else list(balance.weights),
            "class_balance": balance.to_card()}
    ref = tracking.start_training_run(cfg, model_dir, run_name=f"train {join(model_dir, '')}",
                                      tags={"pixelmill.data": data_uri})
    spec["tracking"] = ref.to_dict() if ref else None
    try:
        results = _launch(spark, cfg, spec, fs)
    except BaseException:
        tracking.end_run(ref, "FAILED")  # rank 0 marks it too when it got that far; this covers a failed launch
        raise
    summary = _summary(results, model_dir, launched_unix=spec["_launched_unix"], t0=t0)
    summary["mlflow"] = spec["tracking"]
    log.info("training done: %d epochs (%d this run), %s, model %s", summary["epochs_completed"],
             summary["epochs_run"], ", ".join(f"{k} {v:.4f}" for k, v in sorted(summary["metrics"].items())),
             summary["model_uri"])
    return summary


def _summary(results: List[Dict[str, Any]], model_dir: str, *, launched_unix: float, t0: float) -> Dict[str, Any]:
    """The run's summary from the ranks' results (rank 0's carries the training outcome)."""
    digests = sorted({r["weights_sha256"] for r in results})
    if len(digests) != 1:
        raise InvariantError(f"Horovod ranks finished with different weights ({len(digests)} digests): "
                             "a rank trained on its own; check that every rank ran the same number of steps")
    head = next(r for r in results if r["rank"] == 0)
    return {
        "model_dir": model_dir, "model_uri": model_file_uri(model_dir), "model_id": head["model_id"],
        "epochs_completed": head["epochs_completed"], "epochs_run": head["epochs_run"],
        "exported_epoch": head["exported_epoch"], "best_epoch": head["best_epoch"],
        "stopped_early": head["stopped_early"], "resumed_from": head["resumed_from"], "metrics": head["metrics"],
        "num_proc": len(results),
        "weights_sha256": [r["weights_sha256"] for r in sorted(results, key=lambda r: r["rank"])],
        "images_per_second": head["images_per_second"], "skipped": False,
        "timings": {
            "total_s": round(time.time() - t0, 3),
            "launch_overhead_s": (round(head["first_step_unix"] - launched_unix, 3) if head["first_step_unix"]
                                  else None),
        },
    }


def _executor_python(spark: "SparkSession") -> str:
    """The interpreter Horovod starts on executors: the one Spark's Python workers use.

    ``horovod.spark.run`` defaults to the driver's ``sys.executable``, a path that
    does not exist on cluster nodes running a packed env (``./env/bin/python``).
    """
    conf = spark.sparkContext.getConf()
    return (conf.get("spark.pyspark.python", None) or os.environ.get("PYSPARK_PYTHON") or sys.executable)


def _launch(spark: "SparkSession", cfg: "Config", spec: Dict[str, Any], fs: "FileSystem") -> List[Dict[str, Any]]:
    """``horovod.spark.run`` watched by a :class:`Watchdog`; returns the per-rank results.

    Horovod installs signal handlers, so it must run in the main thread; the watchdog runs
    beside it and, when progress stops, cancels the Spark job group (which ends the Horovod
    tasks) and, if Horovod still has not returned after a grace period, interrupts the main
    thread.
    """
    import _thread

    import horovod.spark
    from horovod.spark.driver import job_id

    from pipeline.train.worker import train_fn

    tc, model_dir = cfg.train, spec["model_dir"]
    tap = _OutputTap()
    progress = ProgressReader(fs, model_dir, spec["run_id"])
    progress.clear()
    sc = spark.sparkContext
    sc.setJobDescription(f"pixelmill train {tc.num_proc} Horovod process(es) -> {model_dir}")
    group = f"horovod.spark.run.{job_id.JOB_ID + 1}"  # the group horovod.spark.run is about to use
    dog = Watchdog(progress, start_timeout=tc.start_timeout, step_timeout=tc.step_timeout, model_dir=model_dir,
                   group=group, cancel=lambda: sc.cancelJobGroup(group), interrupt=_thread.interrupt_main)
    spec["_launched_unix"] = time.time()
    log.info("launching %d Horovod process(es) (Spark job group %s); start_timeout %ds, step_timeout %ds",
             tc.num_proc, group, tc.start_timeout, tc.step_timeout)
    try:
        with dog:
            results = horovod.spark.run(
                train_fn, args=(spec,), num_proc=tc.num_proc, start_timeout=tc.start_timeout,
                use_gloo=True, nics=list(tc.nics) if tc.nics else None, env=horovod_env(cfg),
                stdout=tap, stderr=tap, verbose=1 if tc.verbose >= 2 else 0,
                executable=_executor_python(spark))
    except BaseException as err:  # noqa: BLE001 - every failure becomes one line
        if dog.reason:
            raise TrainingError(dog.reason) from err
        if isinstance(err, KeyboardInterrupt):
            sc.cancelJobGroup(group)
            raise
        raise TrainingError(_explain_failure(err, tap, cfg, model_dir)) from err
    if dog.reason:  # pragma: no cover - cancelled right as it finished
        raise TrainingError(dog.reason)
    progress.clear()  # kept after a failure: it shows where training stopped
    return list(results)

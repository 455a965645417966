"""What rank 0 writes into the model-dir besides checkpoints (layout: docs/contracts.md).

After every epoch: the checkpoint (:mod:`pipeline.train.checkpoints`), ``history.csv``,
``training_curves.png`` and TensorBoard scalars (:func:`write_epoch_outputs`). At the end:
``model/`` (``model.keras`` and the SavedModel ``saved_model/``, :mod:`pipeline.train.serving`),
committed in one rename, and then ``model.json``, the model card that describes it
(:func:`export`), written with :func:`pipeline.contracts.write_model_card`.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence

from pipeline.contracts import (CHECKPOINTS_DIR, CURVES_PNG, HISTORY_CSV, MODEL_FILE, MODEL_SUBDIR, SAVED_MODEL_DIR,
                                TENSORBOARD_DIR, model_file_uri, write_model_card)
from pipeline.fs import join, local_path
from pipeline.imaging.stored import ImageSpec, Normalization
from pipeline.train import checkpoints
from pipeline.train.serving import export_saved_model, serving_card

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import Config, TrainConfig
    from pipeline.contracts import IngestManifest
    from pipeline.fs import FileSystem
    from pipeline.train.schedule import EarlyStopping

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate",
                   "images_per_second", "epoch_seconds")
_STAGING_PREFIX = ".tmp-model-"
_SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second")


def history_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(HISTORY_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in HISTORY_COLUMNS})
    return buf.getvalue()


def phase_boundaries(rows: Sequence[Mapping[str, Any]]) -> List[float]:
    """Epoch positions (half-way between epochs) where the history's ``phase`` changes."""
    return [(a["epoch"] + b["epoch"]) / 2 for a, b in zip(rows, rows[1:])
            if a.get("phase") and b.get("phase") and a["phase"] != b["phase"]]


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
        for boundary in phase_boundaries(rows):  # e.g. the backbone unfrozen after the frozen epochs
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=1)
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


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class TensorBoardLog:
    """Rank 0's TensorBoard writer: straight into ``<model_dir>/tensorboard`` on a local model-dir,
    else into a temporary folder uploaded after every epoch. A context manager; closes the writer."""

    def __init__(self, fs: "FileSystem", model_dir: str) -> None:
        import tensorflow as tf

        self.fs, self.uri = fs, join(model_dir, TENSORBOARD_DIR)
        local = local_path(self.uri)
        self.tmp = None if local else tempfile.mkdtemp(prefix="pixelmill-tb-")
        os.makedirs(local or self.tmp, exist_ok=True)
        self.writer = tf.summary.create_file_writer(local or self.tmp)

    def write(self, row: Mapping[str, Any], epoch: int) -> None:
        import tensorflow as tf

        with self.writer.as_default(step=epoch):
            for k in _SCALARS:
                if row.get(k) is not None:
                    tf.summary.scalar(k, row[k])
        self.writer.flush()
        if self.tmp:
            self.fs.upload_tree(self.tmp, self.uri)

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_epoch_outputs(fs: "FileSystem", model_dir: str, *, model: Any, optimizer: Any, tensorboard: TensorBoardLog,
                        history: List[Dict[str, Any]], es: "EarlyStopping", fingerprint: Mapping[str, Any],
                        tc: "TrainConfig") -> None:
    """After an epoch: TensorBoard scalars, the checkpoint (then pruning), history and curves."""
    epoch = int(history[-1]["epoch"])
    tensorboard.write(history[-1], epoch)
    state = {
        "epoch": epoch, "global_step": int(optimizer.iterations.numpy()), "history": history,
        "early_stopping": es.to_dict(), "fingerprint": fingerprint,
        "finished": bool(es.stopped or epoch >= tc.epochs), "target_epochs": tc.epochs, "created_utc": _utc_now(),
    }
    name = checkpoints.save(fs, model_dir, model, optimizer, state)
    checkpoints.prune(fs, model_dir, keep_last=tc.keep_checkpoints,
                      keep_epochs=[es.best_epoch] if tc.restore_best and es.best_epoch else [])
    fs.write_text(join(model_dir, HISTORY_CSV), history_csv(history))
    fs.write_bytes(join(model_dir, CURVES_PNG), curves_png(history))
    log.info("checkpoint %s/%s/%s written", model_dir, CHECKPOINTS_DIR, name)


def _restore_best(fs: "FileSystem", model_dir: str, model: Any, history: List[Dict[str, Any]],
                  es: "EarlyStopping") -> Dict[str, Any]:
    """Load the best epoch's weights into ``model`` when it still has a checkpoint; returns its history row."""
    name = checkpoints.checkpoint_name(es.best_epoch)
    if not checkpoints.is_complete(fs, model_dir, name):
        log.warning("best checkpoint %s is gone: exporting the last epoch", name)
        return history[-1]
    checkpoints.load_weights(fs, model_dir, name, model)
    log.info("exporting the best epoch %d (%s %.4f)", es.best_epoch, es.metric, es.best)
    return next(r for r in history if r["epoch"] == es.best_epoch)


def _commit_model_folder(fs: "FileSystem", model_dir: str, local: str) -> None:
    """Replace ``<model_dir>/model/`` by the local folder ``local`` in one rename.

    The folder is uploaded under ``.tmp-model-<hex>`` (debris of a crashed export is removed
    first), then the old ``model/`` is deleted and the new one renamed into place, so
    ``model.keras`` and ``saved_model/`` are always from the same export; ``model.json`` is
    written after this, so a card never describes a model that is not all there.
    """
    for entry in fs.entries(model_dir):
        if entry.name.startswith(_STAGING_PREFIX):
            fs.delete(entry.uri)
    staging = join(model_dir, f"{_STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    for dirpath, _, files in os.walk(local):
        sub = os.path.relpath(dirpath, local)
        target = staging if sub == "." else join(staging, *sub.split(os.sep))
        fs.mkdirs(target)
        for name in files:
            fs.upload(os.path.join(dirpath, name), join(target, name))
    final = join(model_dir, MODEL_SUBDIR)
    fs.delete(final)
    fs.rename(staging, final)


def export(fs: "FileSystem", model_dir: str, *, model: Any, spec: Mapping[str, Any], cfg: "Config",
           manifest: "IngestManifest", history: List[Dict[str, Any]], es: "EarlyStopping") -> Dict[str, Any]:
    """Write ``model/model.keras`` and then ``model.json``; returns what the run's summary reports."""
    tc = cfg.train
    last = history[-1]
    chosen = last
    if tc.restore_best and es.best_epoch and es.best_epoch != last["epoch"]:
        chosen = _restore_best(fs, model_dir, model, history, es)
    norm = Normalization.from_mode(cfg.loader.normalize, manifest, manifest.image.channels)
    with tempfile.TemporaryDirectory(prefix="pixelmill-export-") as tmp:
        local = os.path.join(tmp, MODEL_SUBDIR)
        os.makedirs(local)
        model.save(os.path.join(local, MODEL_FILE))
        with open(os.path.join(local, MODEL_FILE), "rb") as f:
            blob = f.read()
        export_saved_model(model, os.path.join(local, SAVED_MODEL_DIR), ImageSpec.from_manifest(manifest), norm,
                           max_pixels=int(manifest.config.get("max_pixels") or cfg.ingest.max_pixels))
        _commit_model_folder(fs, model_dir, local)
    model_id = hashlib.sha256(blob).hexdigest()[:16]
    metrics = {"train_loss": chosen["train_loss"], "train_accuracy": chosen["train_accuracy"]}
    if chosen.get("val_loss") is not None:
        metrics.update(val_loss=chosen["val_loss"], val_accuracy=chosen["val_accuracy"])
    write_model_card(fs, model_dir, {
        "model_id": model_id, "created_utc": _utc_now(), "classes": dict(manifest.classes),
        "image": manifest["image"], "normalization": norm.to_dict(),
        "ingest_manifest_sha256": spec["manifest_sha256"], "epochs_completed": int(last["epoch"]),
        "exported_epoch": int(chosen["epoch"]), "stopped_early": bool(es.stopped), "metrics": metrics,
        "stack": stack_versions(),
        "config": {"train": cfg.train.model_dump(mode="json"), "loader": cfg.loader.model_dump(mode="json")},
        "data_uri": (spec.get("data") or {}).get("uri", spec["data_uri"]), "data_snapshot": spec.get("data"),
        "num_proc": int(spec.get("num_proc", 0)) or None,
        "init_weights": spec.get("init_weights"), "class_balance": spec.get("class_balance"),
        "serving": serving_card(), "mlflow": spec.get("tracking"),
    })
    log.info("exported %s (model_id %s, epoch %d)", model_file_uri(model_dir), model_id, chosen["epoch"])
    return {"model_id": model_id, "metrics": metrics, "epochs_completed": int(last["epoch"]),
            "exported_epoch": int(chosen["epoch"]), "stopped_early": bool(es.stopped),
            "best_epoch": int(es.best_epoch), "history": history}

"""Epoch checkpoints in ``<model_dir>/checkpoints/epoch-NNNN/``: save, find, load, prune.

A checkpoint folder holds ``model.weights.h5`` (Keras 3 ``save_weights``),
``optimizer.npz`` (the optimizer's variables in order), ``state.json`` (epoch, history,
early-stopping state, the run's fingerprint) and, written last, ``_COMPLETE``. It is built
under ``.tmp-epoch-NNNN-<hex>`` and renamed into place, so a crash leaves debris (pruned
later) but never a folder that looks complete.

Why not ``tf.train.CheckpointManager``: it keeps and prunes ``tf.train.Checkpoint`` files
written through TensorFlow's own filesystems, while these checkpoints are Keras 3 ``.h5``
weights plus numpy arrays and JSON that go through :mod:`pipeline.fs` (any pyarrow store:
file, hdfs, s3, gs), with a ``_COMPLETE`` marker other processes (the driver) check without
TensorFlow; and its ``max_to_keep`` rule keeps only the newest, whereas here the best epoch
by ``train.early_stopping.metric`` is kept too, because the export restores it
(``train.restore_best``). What is left to write by hand is the two pure rules below
(:func:`latest_complete`, :func:`checkpoints_to_delete`) and the folder protocol.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import uuid
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Tuple

from pipeline.contracts import CHECKPOINT_COMPLETE, CHECKPOINTS_DIR
from pipeline.fs import join

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.fs import FileSystem

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^epoch-(\d{4,})$")
_TMP_PREFIX = ".tmp-"
_WEIGHTS = "model.weights.h5"
_OPTIMIZER = "optimizer.npz"
_STATE = "state.json"


# --- pure rules (unit-tested without storage) -------------------------------------------

def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def latest_complete(names: Iterable[str], complete: Iterable[str]) -> Optional[Tuple[int, str]]:
    """``(epoch, name)`` of the newest checkpoint folder whose ``_COMPLETE`` marker exists."""
    done = set(complete)
    best: Optional[Tuple[int, str]] = None
    for name in names:
        m = _NAME_RE.match(name)
        if m and name in done:
            ep = int(m.group(1))
            if best is None or ep > best[0]:
                best = (ep, name)
    return best


def checkpoints_to_delete(names: Iterable[str], *, keep_last: int, keep_epochs: Iterable[int] = ()) -> List[str]:
    """Checkpoint folders to prune: all but the newest ``keep_last`` and ``keep_epochs``; temp debris too."""
    names = list(names)
    epochs = sorted((int(m.group(1)), n) for n in names if (m := _NAME_RE.match(n)))
    keep = {n for _, n in epochs[-keep_last:]} | {checkpoint_name(e) for e in keep_epochs}
    out = [n for _, n in epochs if n not in keep]
    out += [n for n in names if n.startswith(_TMP_PREFIX)]
    return sorted(out)


# --- the folders ------------------------------------------------------------------------------

def _dir(model_dir: str, name: str = "") -> str:
    return join(model_dir, CHECKPOINTS_DIR, name) if name else join(model_dir, CHECKPOINTS_DIR)


def is_complete(fs: "FileSystem", model_dir: str, name: str) -> bool:
    return fs.exists(join(_dir(model_dir, name), CHECKPOINT_COMPLETE))


def find_latest(fs: "FileSystem", model_dir: str) -> Optional[Tuple[int, str]]:
    """``(epoch, name)`` of the newest complete checkpoint in ``model_dir``, or None."""
    names = [e.name for e in fs.entries(_dir(model_dir))]
    return latest_complete(names, [n for n in names if _NAME_RE.match(n) and is_complete(fs, model_dir, n)])


def read_state(fs: "FileSystem", model_dir: str, name: str) -> Dict[str, Any]:
    return fs.read_json(join(_dir(model_dir, name), _STATE))


def save(fs: "FileSystem", model_dir: str, model: Any, optimizer: Any, state: Mapping[str, Any]) -> str:
    """Write ``checkpoints/epoch-NNNN/`` atomically (``state["epoch"]`` names it); returns its name."""
    import numpy as np

    name = checkpoint_name(int(state["epoch"]))
    tmp = _dir(model_dir, f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory(prefix="pixelmill-ckpt-") as local:
        model.save_weights(os.path.join(local, _WEIGHTS))
        fs.upload(os.path.join(local, _WEIGHTS), join(tmp, _WEIGHTS))
    buf = io.BytesIO()
    np.savez(buf, **{f"v{i:04d}": v.numpy() for i, v in enumerate(optimizer.variables)})
    fs.write_bytes(join(tmp, _OPTIMIZER), buf.getvalue())
    fs.write_text(join(tmp, _STATE), json.dumps(state, indent=2, sort_keys=True, default=float))
    fs.write_text(join(tmp, CHECKPOINT_COMPLETE), "")
    final = _dir(model_dir, name)
    fs.delete(final)  # a folder from an earlier, crashed attempt at the same epoch
    fs.rename(tmp, final)
    return name


def load_weights(fs: "FileSystem", model_dir: str, name: str, model: Any) -> None:
    """Restore ``model``'s weights from checkpoint ``name``."""
    with tempfile.TemporaryDirectory(prefix="pixelmill-ckpt-") as local:
        path = os.path.join(local, _WEIGHTS)
        fs.download(join(_dir(model_dir, name), _WEIGHTS), path)
        model.load_weights(path)


def load(fs: "FileSystem", model_dir: str, name: str, model: Any, optimizer: Any) -> Dict[str, Any]:
    """Restore weights and optimizer state from checkpoint ``name``; returns its state dict."""
    import numpy as np

    load_weights(fs, model_dir, name, model)
    arrays = np.load(io.BytesIO(fs.read_bytes(join(_dir(model_dir, name), _OPTIMIZER))))
    if len(arrays.files) != len(optimizer.variables):
        raise ValueError(f"checkpoint {name} has {len(arrays.files)} optimizer variables, the optimizer has "
                         f"{len(optimizer.variables)}: use --mode overwrite to start fresh")
    for i, v in enumerate(optimizer.variables):
        v.assign(arrays[f"v{i:04d}"])
    return read_state(fs, model_dir, name)


def prune(fs: "FileSystem", model_dir: str, *, keep_last: int, keep_epochs: Iterable[int] = ()) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and those of ``keep_epochs`` (and temp debris)."""
    names = [e.name for e in fs.entries(_dir(model_dir))]
    for old in checkpoints_to_delete(names, keep_last=keep_last, keep_epochs=keep_epochs):
        fs.delete(_dir(model_dir, old))

"""The trained model scoring runs, checked on the driver before any output is touched.

``model.json`` is read and checked by :func:`pipeline.contracts.read_model_card`; this
module adds what only scoring needs: the card must agree with the data
(:func:`check_compatible`) and with the model file itself (:func:`driver_model_file`:
``model_id`` is the sha256 of ``model.keras``; :func:`check_model_file`: it loads in
Keras safe mode, with the card's input shape and number of classes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from typing import Mapping, Tuple

from pipeline.contracts import MODEL_CARD, IngestManifest, ModelCard, class_order, model_file_uri
from pipeline.contracts import read_model_card, resolve_model_dir
from pipeline.errors import DataError
from pipeline.fs import FileSystem, local_path
from pipeline.imaging.stored import ImageSpec, Normalization


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A training output's exported model and what its ``model.json`` says about it."""

    model_dir: str
    keras_uri: str
    card: ModelCard
    classes: Tuple[str, ...]          # index order
    spec: ImageSpec
    norm: Normalization

    @property
    def model_id(self) -> str:
        return self.card.model_id


def read_model_info(fs: FileSystem, model_uri: str) -> ModelInfo:
    """Resolve ``model_uri`` to a model dir and read its checked ``model.json`` (no TensorFlow needed)."""
    model_dir = resolve_model_dir(fs, model_uri)
    card = read_model_card(fs, model_dir)
    return ModelInfo(model_dir, model_file_uri(model_dir), card, class_order(card.classes),
                     ImageSpec.from_manifest(card), Normalization.from_dict(card.normalization))


def check_compatible(model: ModelInfo, manifest: IngestManifest, data_uri: str) -> None:
    """Raise DataError when the model and the ingest output disagree (size, channels, classes)."""
    data_spec, m = ImageSpec.from_manifest(manifest), model.spec
    if (data_spec.height, data_spec.width) != (m.height, m.width):
        raise DataError(
            f"image size differs: model {model.model_id} expects {m.height}x{m.width} (height x width) but {data_uri} "
            f"holds {data_spec.height}x{data_spec.width}: ingest the data with ingest.height={m.height} "
            f"ingest.width={m.width}, or score with the model trained on it")
    if data_spec.channels != m.channels:
        mode = "L" if m.channels == 1 else "RGB"
        raise DataError(
            f"channels differ: model {model.model_id} expects {m.channels} but {data_uri} holds "
            f"{data_spec.channels} ({manifest.image.color_mode}): ingest the data with ingest.color_mode={mode}")
    _check_classes(model, manifest.classes, data_uri)


def _check_classes(model: ModelInfo, data_classes: Mapping[str, int], data_uri: str) -> None:
    model_index = {n: i for i, n in enumerate(model.classes)}
    for name, idx in sorted(data_classes.items(), key=lambda kv: kv[1]):
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


def driver_model_file(fs: FileSystem, model: ModelInfo) -> str:
    """A driver-local copy of ``model.keras`` named by its id (the file itself when local), checked against it."""
    path = local_path(model.keras_uri)
    if path is None:
        cache = os.path.join(tempfile.gettempdir(), "pixelmill-models")
        os.makedirs(cache, exist_ok=True)
        path = os.path.join(cache, f"model-{model.model_id}.keras")
        if not (os.path.exists(path) and _sha256_16(path) == model.model_id):
            fs.download(model.keras_uri, path)
    digest = _sha256_16(path)
    if digest != model.model_id:
        raise DataError(f"{model.keras_uri} does not match its {MODEL_CARD} (model_id {model.model_id}, file sha256 "
                        f"{digest}...): the model was replaced after export; re-export it with train")
    return path


#: Models this driver process has loaded and checked, by (file, model_id, ...): the id is the file's
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
        raise DataError(f"model input shape {in_shape} disagrees with {MODEL_CARD} image "
                        f"{model.spec.shape} (height, width, channels): re-export the model with train")
    out = m.outputs[0].shape[-1] if m.outputs else None
    if out != len(model.classes):
        raise DataError(f"model outputs {out} classes but {MODEL_CARD} lists {len(model.classes)}: "
                        "re-export the model with train")
    _CHECKED_MODELS.add(key)


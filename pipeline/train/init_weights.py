"""``train.init_weights``: where a fresh run's weights come from, checked before any Spark work.

* ``null``: random initialisation (``train.seed``).
* ``imagenet``: the standard Keras no-top weight file of the backbone, read from the Keras
  cache (``$KERAS_HOME/models/``, default ``~/.keras/models/``). Nothing is downloaded.
* a URI of a weights file (``*.weights.h5``, ``*.h5`` or ``*.keras``, any scheme
  :mod:`pipeline.fs` reads) holding the backbone (or, for ``compact_cnn`` / ``resnet``,
  the whole model).
* a URI of an earlier pixelmill model-dir (warm start): backbone and head when its classes
  equal the data's, the backbone (every layer but the head) with a new head when not.

:func:`resolve` runs on the driver before launch: it finds the file, hashes it and loads it
into a model built like the one training builds, so a missing or mismatched file is one
:class:`ConfigError` line (exit 2) and nothing is written. In the Horovod processes rank 0
calls :func:`apply` on a fresh start; the worker's broadcast of rank 0's weights gives every
rank the same ones. The model card records :meth:`WeightsSource.to_card`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Tuple

from pipeline.contracts import MODEL_CARD, class_order, model_file_uri, read_model_card
from pipeline.errors import ConfigError, DataError
from pipeline.fs import filesystem, join, to_uri
from pipeline.train.models import BACKBONES, HEAD_LAYER, backbone_of

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.fs import FileSystem

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
WEIGHT_FILE_SUFFIXES = (".weights.h5", ".keras", ".h5")


@dataclass(frozen=True)
class WeightsSource:
    """A resolved ``train.init_weights`` (plain data: it travels to the Horovod processes)."""

    #: ``imagenet``, ``file`` or ``model_dir``.
    kind: str
    #: The weights file (for a model-dir: its ``model/model.keras``).
    uri: str
    sha256: str
    #: ``all`` (every layer) or ``backbone`` (every layer but the head, which starts random).
    loaded: str
    #: The model-dir of a warm start.
    model_dir: Optional[str] = None

    def to_card(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WeightsSource":
        return cls(**{k: d.get(k) for k in ("kind", "uri", "sha256", "loaded", "model_dir")})


def keras_cache_dir() -> str:
    """``$KERAS_HOME/models`` (default ``~/.keras/models``): where Keras keeps downloaded weights."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(os.path.abspath(home), "models")


def _locate(init: str, model: str, classes: Mapping[str, int]) -> Tuple[str, str, Optional[str], str]:
    """``(kind, file uri, model_dir, loaded)`` for ``train.init_weights=init``; ConfigError when absent."""
    if init == IMAGENET:
        if model not in BACKBONES:
            raise ConfigError(f"train.init_weights=imagenet needs a Keras application backbone as train.model "
                              f"({', '.join(BACKBONES)}), not {model}")
        folder, name = keras_cache_dir(), BACKBONES[model].weights_file
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ConfigError(f"train.init_weights=imagenet: {name} is not in {folder}/ (nothing is downloaded at "
                              f"run time): put the Keras file {name} into {folder}/ or set KERAS_HOME")
        return IMAGENET, to_uri(path), None, "backbone" if model in BACKBONES else "all"
    uri = to_uri(init)
    fs = filesystem(uri)
    if uri.endswith(WEIGHT_FILE_SUFFIXES):
        if not fs.exists(uri):
            raise ConfigError(f"train.init_weights={uri} does not exist")
        return "file", uri, None, "backbone" if model in BACKBONES else "all"
    if not fs.exists(join(uri, MODEL_CARD)):
        raise ConfigError(f"train.init_weights={uri} is neither a weights file ({', '.join(WEIGHT_FILE_SUFFIXES)}) "
                          f"nor a pixelmill model-dir (no {MODEL_CARD})")
    try:
        card = read_model_card(fs, uri)
    except DataError as e:
        raise ConfigError(f"train.init_weights={uri}: {e}") from None
    trained = (card.config.get("train") or {}).get("model")
    if trained and trained != model:
        raise ConfigError(f"train.init_weights={uri} holds a {trained} model but train.model is {model}: "
                          f"set train.model={trained} or choose another model-dir")
    same = class_order(card.classes) == class_order(classes)
    if not same:
        log.info("warm start from %s: its classes differ from the data's, so the head starts fresh", uri)
    return "model_dir", model_file_uri(uri), uri, "all" if same else "backbone"


def resolve(init: Optional[str], model: Any, classes: Mapping[str, int], *,
            model_name: str) -> Optional[WeightsSource]:
    """Find, hash and trial-load ``train.init_weights`` into ``model`` (driver pre-flight)."""
    if not init:
        return None
    kind, uri, model_dir, loaded = _locate(init, model_name, classes)
    data = filesystem(uri).read_bytes(uri)
    source = WeightsSource(kind, uri, hashlib.sha256(data).hexdigest(), loaded, model_dir)
    _load_bytes(model, source, data, model_name=model_name)
    return source


def apply(model: Any, source: WeightsSource, *, model_name: str) -> None:
    """Load ``source`` into ``model`` (rank 0 of a fresh run); refuses a file changed since the pre-flight."""
    data = filesystem(source.uri).read_bytes(source.uri)
    if hashlib.sha256(data).hexdigest() != source.sha256:
        raise ConfigError(f"train.init_weights file {source.uri} changed after the run was checked")
    _load_bytes(model, source, data, model_name=model_name)
    log.info("initial weights (%s) from %s, sha256 %s", source.loaded, source.uri, source.sha256[:12])


def _load_bytes(model: Any, source: WeightsSource, data: bytes, *, model_name: str) -> None:
    name = source.uri.rsplit("/", 1)[-1]
    target = backbone_of(model) if (model_name in BACKBONES and source.kind != "model_dir") else model
    with tempfile.TemporaryDirectory(prefix="pixelmill-init-") as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        try:
            if path.endswith(".keras"):
                _load_keras_file(target, path, skip_head=source.loaded == "backbone" and target is model,
                                 into_backbone=target is not model)
            else:
                target.load_weights(path)
        except ConfigError as e:
            raise ConfigError(f"train.init_weights {source.uri} does not fit train.model={model_name}: {e}") from None
        except Exception as e:  # noqa: BLE001 - Keras' own loaders: one line naming what did not fit
            raise ConfigError(f"train.init_weights {source.uri} does not fit train.model={model_name}: "
                              f"{_keras_load_error(e)}") from None


def _keras_load_error(err: BaseException) -> str:
    """The first line of a Keras weight-loading error, with the layer that did not fit named up front."""
    text = str(err).strip()
    many = re.search(r"A total of (\d+) objects could not be loaded\. Example error message for object "
                     r"<(\w+) name=([^,>]+)", text)
    if many:
        more = int(many.group(1)) - 1
        return f"layer {many.group(3)} ({many.group(2)}) does not fit" + (f", nor do {more} more" if more else "")
    return (text.splitlines() or [type(err).__name__])[0][:400]


def _weighted_layers(model: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """``(path, layer)`` of every layer holding weights, nested models walked, in build order."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _weighted_layers(layer, f"{prefix}{layer.name}/")
        elif layer.weights:
            yield f"{prefix}{layer.name}", layer


def _shapes(layer: Any) -> List[Tuple[int, ...]]:
    return [tuple(int(d) for d in w.shape) for w in layer.weights]


def _load_keras_file(target: Any, path: str, *, skip_head: bool, into_backbone: bool) -> None:
    """Copy a saved ``.keras`` model's weights into ``target`` layer by layer, in build order.

    When ``target`` is a backbone and the file a whole model, its backbone is taken. Layers are
    paired by position (Keras numbers unnamed layers per process, so names can differ) and
    every pair must hold weights of the same shapes; the first that does not is named.
    """
    import keras

    source = keras.saving.load_model(path, compile=False, safe_mode=True)
    inner = backbone_of(source)
    if into_backbone and inner is not None:
        source = inner  # a whole model's backbone into the backbone
    want = [(p, layer) for p, layer in _weighted_layers(target) if not (skip_head and p == HEAD_LAYER)]
    have = [(p, layer) for p, layer in _weighted_layers(source) if not (skip_head and p == HEAD_LAYER)]
    for i, (path_t, layer_t) in enumerate(want):
        if i >= len(have):
            raise ConfigError(f"layer {path_t} has no counterpart: the file holds {len(have)} layers with weights, "
                              f"the model {len(want)}")
        path_s, layer_s = have[i]
        if _shapes(layer_t) != _shapes(layer_s):
            raise ConfigError(f"layer {path_t} needs weights of shapes {_shapes(layer_t)}, the file's {path_s} "
                              f"holds {_shapes(layer_s)}")
    if len(have) != len(want):
        raise ConfigError(f"the file holds {len(have)} layers with weights, the model {len(want)} "
                          f"(first extra: {have[len(want)][0]})")
    for (_, layer_t), (_, layer_s) in zip(want, have):
        layer_t.set_weights(layer_s.get_weights())

"""The fine-tuning schedule: which variables train in which epoch, and at which learning rate.

``train.freeze_epochs`` epochs train only the head (the ``probabilities`` layer, after its
dropout) with the backbone frozen and called with ``training=False`` (its BatchNorm layers
use their moving statistics and do not update them). Later epochs also train the backbone,
whole or from the layer ``train.unfreeze_from`` on (layers before it keep ``trainable=False``,
which in Keras 3 also keeps their BatchNorm in inference mode), with a second optimizer at
``train.backbone_lr_multiplier`` x the head's rate.

"Backbone" is every layer but the head: for a Keras application, the application (its
preprocessing layers hold no trainable weights); for ``compact_cnn`` / ``resnet``, every
layer below the softmax.

The phase is a pure function of the epoch number (:meth:`Schedule.phase`), so every Horovod
rank changes its trainable set at the same step and a resumed run picks the phase of its
next epoch. With all three keys at their defaults there is no schedule: one optimizer
trains every variable, as without this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple

from pipeline.errors import ConfigError
from pipeline.train.models import HEAD_LAYER

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import TrainConfig

#: ``phase`` values in ``history.csv``.
FULL, FROZEN, UNFROZEN = "full", "frozen", "unfrozen"
#: The head's dropout layer name (see :func:`pipeline.train.models._classifier_head`).
HEAD_DROPOUT = "classifier_dropout"


@dataclass(frozen=True)
class Schedule:
    """``train.freeze_epochs`` / ``unfreeze_from`` / ``backbone_lr_multiplier`` as plain data."""

    freeze_epochs: int = 0
    unfreeze_from: Optional[str] = None
    backbone_lr_multiplier: float = 1.0

    @classmethod
    def from_config(cls, tc: "TrainConfig") -> "Schedule":
        return cls(int(tc.freeze_epochs), tc.unfreeze_from, float(tc.backbone_lr_multiplier))

    @property
    def active(self) -> bool:
        """False when every key is at its default: one optimizer, every variable, every epoch."""
        return self.freeze_epochs > 0 or self.unfreeze_from is not None or self.backbone_lr_multiplier != 1.0

    def phase(self, epoch: int) -> str:
        """The phase of 1-based ``epoch``: decided by the epoch number alone, the same on every rank.

        >>> [Schedule(2).phase(e) for e in (1, 2, 3)]
        ['frozen', 'frozen', 'unfrozen']
        >>> Schedule().phase(1)
        'full'
        """
        if not self.active:
            return FULL
        return FROZEN if epoch <= self.freeze_epochs else UNFROZEN

    def fingerprint(self) -> Dict[str, Any]:
        """The keys that are set (not at their defaults): what a resumed checkpoint must match."""
        out: Dict[str, Any] = {}
        if self.freeze_epochs:
            out["freeze_epochs"] = self.freeze_epochs
        if self.unfreeze_from is not None:
            out["unfreeze_from"] = self.unfreeze_from
        if self.backbone_lr_multiplier != 1.0:
            out["backbone_lr_multiplier"] = self.backbone_lr_multiplier
        return out


def _flat_layers(model: Any) -> Iterator[Any]:
    """Every layer in build order, nested models walked (the nested model itself not listed)."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def _head_layers(model: Any) -> List[Any]:
    names = [layer.name for layer in model.layers]
    if HEAD_LAYER not in names:
        raise ConfigError(f"the model has no {HEAD_LAYER!r} layer: a fine-tuning schedule needs pixelmill's head")
    return [model.get_layer(n) for n in (HEAD_DROPOUT, HEAD_LAYER) if n in names]


def unfreeze_problem(model: Any, name: Optional[str], model_name: str) -> str:
    """Empty when ``train.unfreeze_from=name`` names a backbone layer of ``model``, else a one-line reason."""
    if name is None:
        return ""
    head = {id(layer) for layer in _head_layers(model)}
    layers = [layer for layer in _flat_layers(model) if id(layer) not in head]
    if any(layer.name == name for layer in layers):
        return ""
    weighted = [layer.name for layer in layers if layer.trainable_weights]
    picks = sorted({0, len(weighted) // 3, 2 * len(weighted) // 3, len(weighted) - 1}) if weighted else []
    return (f"train.unfreeze_from={name!r} is not a backbone layer of train.model={model_name}: name one of its "
            f"{len(weighted)} layers with weights, e.g. {', '.join(weighted[i] for i in picks)}")


class Split:
    """A built model cut into head and backbone: the variables of each phase and the frozen forward pass.

    Built once, before any checkpoint is restored, from the variables trainable at build time.
    """

    def __init__(self, model: Any, schedule: Schedule, model_name: str) -> None:
        import keras

        self.model, self.schedule = model, schedule
        problem = unfreeze_problem(model, schedule.unfreeze_from, model_name)
        if problem:
            raise ConfigError(problem)
        self.head_layers = _head_layers(model)
        head = {id(layer) for layer in self.head_layers}
        self.head_vars = [v for layer in self.head_layers for v in layer.trainable_weights]
        backbone = [layer for layer in _flat_layers(model) if id(layer) not in head]
        start = next((i for i, layer in enumerate(backbone) if layer.name == schedule.unfreeze_from), 0)
        #: Backbone layers that stay frozen after the boundary (before ``unfreeze_from``).
        self.kept_frozen = backbone[:start]
        self.unfrozen_vars = [v for layer in backbone[start:] for v in layer.trainable_weights]
        #: The features the head reads: the backbone as one model, called with training=False when frozen.
        self.features = keras.Model(model.input, self.head_layers[0].input, name="pixelmill_features")
        self._sync = {FROZEN: [v for layer in self.head_layers for v in layer.non_trainable_weights],
                      UNFROZEN: list(model.non_trainable_variables)}

    def variables(self, phase: str) -> Tuple[List[Any], List[Any]]:
        """``(head variables, backbone variables)`` trained in ``phase``."""
        return (self.head_vars, []) if phase == FROZEN else (self.head_vars, self.unfrozen_vars)

    def enter(self, phase: str) -> None:
        """Before the phase's step is traced: layers before ``unfreeze_from`` stop training for good."""
        if phase == UNFROZEN:
            for layer in self.kept_frozen:
                layer.trainable = False

    def forward(self, x: Any, phase: str) -> Any:
        """The class probabilities of a training step in ``phase``."""
        if phase != FROZEN:
            return self.model(x, training=True)
        y = self.features(x, training=False)
        for layer in self.head_layers:
            y = layer(y, training=True) if layer.name == HEAD_DROPOUT else layer(y)
        return y

    def synced(self, phase: str) -> List[Any]:
        """Non-trainable variables (BatchNorm statistics) that training can change in ``phase``."""
        return self._sync[phase]


def check_unfreeze_from(tc: "TrainConfig", image_shape: Tuple[int, int, int], num_classes: int) -> None:
    """Driver pre-flight: an unknown ``train.unfreeze_from`` is one ConfigError line before launch."""
    if tc.unfreeze_from is None:
        return
    from pipeline.train.models import build_model

    model = build_model(tc.model, image_shape, num_classes, dropout=tc.dropout, weight_decay=tc.weight_decay,
                        width=tc.width, convs_per_block=tc.convs_per_block)
    problem = unfreeze_problem(model, tc.unfreeze_from, tc.model)
    if problem:
        raise ConfigError(problem)

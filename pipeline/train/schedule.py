"""When training changes pace and when it stops: the learning-rate schedule and early stopping.

The learning rate warms up linearly from ``train.learning_rate`` to ``learning_rate x
num_proc`` over ``warmup_epochs``, then stays there (``constant``) or decays along a half
cosine to ``min_lr_ratio x peak`` at the planned last step (``cosine``). That is Keras 3's
:class:`keras.optimizers.schedules.CosineDecay` with ``warmup_target``/``warmup_steps``;
``constant`` is the same schedule with ``alpha=1`` (a "decay" to the peak itself). The
schedule is evaluated in float64 (its arguments are numpy float64), so the float32 rate the
optimizer applies is the one the step arithmetic gives exactly, not a float32 approximation.

:class:`EarlyStopping` is plain state (not a Keras callback: the loop is a custom
``GradientTape`` loop) that round-trips through a checkpoint's ``state.json``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

if TYPE_CHECKING:  # pragma: no cover
    from keras.optimizers.schedules import CosineDecay


def learning_rate_schedule(*, base_lr: float, size: int, warmup_steps: int, schedule: str = "constant",
                           total_steps: int = 0, min_ratio: float = 0.0) -> "CosineDecay":
    """The Keras schedule for ``train.lr_schedule``: call it with the optimizer's step count.

    ``cosine`` decays over ``total_steps - warmup_steps`` steps (when there are any left after
    the warm-up) and holds the floor afterwards; ``constant`` holds the peak.
    """
    import numpy as np
    from keras.optimizers.schedules import CosineDecay

    decays = schedule == "cosine" and total_steps > warmup_steps
    return CosineDecay(np.float64(base_lr), decay_steps=(total_steps - warmup_steps) if decays else 1,
                       alpha=np.float64(min_ratio if decays else 1.0), warmup_target=np.float64(base_lr * size),
                       warmup_steps=max(0, int(warmup_steps)))


def learning_rate_at(step: int, *, base_lr: float, size: int, warmup_steps: int, schedule: str = "constant",
                     total_steps: int = 0, min_ratio: float = 0.0) -> float:
    """The rate :func:`learning_rate_schedule` gives at ``step``, as a Python float.

    >>> learning_rate_at(0, base_lr=0.1, size=4, warmup_steps=10)
    0.1
    >>> round(learning_rate_at(5, base_lr=0.1, size=4, warmup_steps=10), 6)
    0.25
    >>> learning_rate_at(10, base_lr=0.1, size=4, warmup_steps=10)
    0.4
    >>> round(learning_rate_at(15, base_lr=0.1, size=4, warmup_steps=10, schedule="cosine", total_steps=20), 6)
    0.2
    """
    return float(learning_rate_schedule(base_lr=base_lr, size=size, warmup_steps=warmup_steps, schedule=schedule,
                                        total_steps=total_steps, min_ratio=min_ratio)(step))


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

    def monitored(self, row: Mapping[str, Any]) -> float:
        """The watched metric in an epoch's history row; without a val split, its train twin."""
        value = row.get(self.metric)
        if value is None:
            value = row[self.metric.replace("val_", "train_")]
        return float(value)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EarlyStopping":
        return cls(**{k: d[k] for k in ("metric", "patience", "min_delta", "best", "best_epoch", "wait", "stopped")})

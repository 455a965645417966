"""``train.class_weight``: per-class loss weights from the train split's class counts.

On the driver, before launch, :func:`for_training` counts the train split's labels
(:func:`train_class_counts`: the ``label_index`` column of its Parquet files, read batch by
batch, so memory is bounded by the number of classes) and resolves the config value into one
weight per class index (:func:`resolve`). The ingest manifest's ``class_counts`` add up every
split; the weights are about what the loss sees, so they come from the train split alone.

The weights travel to the Horovod processes in the launch spec as a list in class-index order,
and every rank builds the same loss from that list (:func:`weighted_loss`): each example's
cross-entropy is multiplied by its class's weight, then averaged over the batch as before. So
every rank applies identical weights, and with ``balanced`` the weights average 1 over the
train split (``sum_c n_c * w_c = n``): the loss keeps its scale and the learning rate needs no
change.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from pipeline.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import Config
    from pipeline.contracts import IngestManifest

BALANCED = "balanced"


@dataclasses.dataclass(frozen=True)
class ClassBalance:
    """The train split's class counts and the loss weights chosen from them (None = unweighted)."""

    classes: Tuple[str, ...]                 #: class names in index order
    train_counts: Tuple[int, ...]            #: train rows per class index
    class_weight: Union[None, str, Dict[str, float]]  #: the config value it came from
    weights: Optional[Tuple[float, ...]]     #: loss weight per class index

    def to_card(self) -> Dict[str, Any]:
        """The model card's ``class_balance`` entry (and the launch spec's)."""
        return {"train_counts": dict(zip(self.classes, self.train_counts)), "class_weight": self.class_weight,
                "weights": None if self.weights is None else dict(zip(self.classes, self.weights))}

    @classmethod
    def from_card(cls, d: Mapping[str, Any]) -> "ClassBalance":
        classes = tuple(d["train_counts"])
        weights = d.get("weights")
        return cls(classes, tuple(int(d["train_counts"][c]) for c in classes), d.get("class_weight"),
                   None if weights is None else tuple(float(weights[c]) for c in classes))


def balanced_weights(counts: Sequence[int]) -> List[float]:
    """``n / (k x n_c)`` over the ``k`` classes present in train; 1.0 for a class with no train rows.

    >>> balanced_weights([90, 10])
    [0.5555555555555556, 5.0]
    """
    present = [n for n in counts if n > 0]
    total, k = sum(present), len(present)
    return [total / (k * n) if n > 0 else 1.0 for n in counts]


def resolve(value: Union[None, str, Mapping[str, float]], classes: Sequence[str],
            counts: Sequence[int]) -> Optional[List[float]]:
    """One weight per class index for ``train.class_weight`` (already validated by the config), or None.

    A mapping names classes of the data; classes it leaves out weigh 1. An unknown name is a
    :class:`ConfigError` naming the key and the data's classes.
    """
    if value is None:
        return None
    if value == BALANCED:
        return balanced_weights(counts)
    unknown = sorted(set(value) - set(classes))  # type: ignore[arg-type]
    if unknown:
        raise ConfigError(f"config key 'train.class_weight': unknown class {unknown[0]!r} "
                          f"(the data's classes: {', '.join(classes)})")
    return [float(value.get(c, 1.0)) for c in classes]  # type: ignore[union-attr]


def train_class_counts(data_uri: str, manifest: "IngestManifest") -> List[int]:
    """Rows per class index in the train split, from its ``label_index`` column (checked against the manifest)."""
    from typing import cast

    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.dataset.layout import LABEL_COLUMN, split_layout
    from pipeline.errors import DataError
    from pipeline.fs import ArrowFS, filesystem

    k = len(manifest.classes)
    layout = split_layout(data_uri, "train", manifest=manifest)
    fs = cast(ArrowFS, filesystem(data_uri))
    counts = np.zeros(k, dtype=np.int64)
    for uri in layout.files:
        arrow_fs, path = fs.arrow(uri)
        with arrow_fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=[LABEL_COLUMN], batch_size=65_536):
                labels = batch.column(0).drop_null().to_numpy(zero_copy_only=False)
                if labels.size and (labels.min() < 0 or labels.max() >= k):
                    raise DataError(f"{uri} has label_index values outside 0..{k - 1}: re-run ingest")
                counts += np.bincount(labels, minlength=k)
    return [int(n) for n in counts]


def for_training(cfg: "Config", data_uri: str, manifest: "IngestManifest") -> ClassBalance:
    """The train split's class balance and ``train.class_weight`` resolved against it (driver, before launch)."""
    classes = manifest.class_order()
    counts = train_class_counts(data_uri, manifest)
    weights = resolve(cfg.train.class_weight, classes, counts)
    return ClassBalance(tuple(classes), tuple(counts), cfg.train.class_weight,
                        None if weights is None else tuple(weights))


def weighted_loss(num_classes: int, label_smoothing: float,
                  weights: Optional[Sequence[float]]) -> Callable[[Any, Any], Any]:
    """``loss(labels, probs)``: categorical cross-entropy, each example weighted by its class's weight.

    Without weights it is exactly the unweighted loss (no sample weights at all).
    """
    import keras
    import tensorflow as tf

    loss_obj = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    table = None if weights is None else tf.constant([float(w) for w in weights], tf.float32)

    def loss(y: Any, probs: Any) -> Any:
        onehot = tf.one_hot(y, num_classes)
        if table is None:
            return loss_obj(onehot, probs)
        return loss_obj(onehot, probs, sample_weight=tf.gather(table, tf.cast(y, tf.int32)))

    return loss

"""The ``tf.data`` side of the loader: decode, normalise, augment, batch -- streamed or from the decoded cache.

:func:`build` turns a :class:`~pipeline.dataset.reader.ReaderSource` into the dataset the
trainer iterates. Decoding (with the decompression-bomb header check) and normalisation are
:mod:`pipeline.imaging.stored`, shared with scoring. Every random draw (shuffle buffer,
augmentation) is keyed by a seed derived from ``(seed, rank, purpose)``, so the same seed
gives the same batches in the same order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Sequence, Tuple

from pipeline.dataset.reader import AUGMENT, ID_COLUMN, SHUFFLE, ReaderSource, derived_seed
from pipeline.imaging.stored import ImageSpec, Normalization, tf_decode, tf_normalize

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from pipeline.config import AugmentConfig, LoaderConfig


def decoded_cache_mb(rows: int, spec: ImageSpec, with_ids: bool = False) -> float:
    """MiB one rank's decoded cache holds: uint8 pixels, the label and (optionally) the image id."""
    per_row = spec.height * spec.width * spec.channels + 8 + (96 if with_ids else 0)
    return rows * per_row / 2**20


def _signature(columns: Sequence[str]) -> Tuple[Any, ...]:
    import tensorflow as tf

    types = {"image": tf.string, "label_index": tf.int32, ID_COLUMN: tf.string}
    return tuple(tf.TensorSpec([None], types[c]) for c in columns)


# --- augmentation ------------------------------------------------------------------------

def augment(x: Any, seed: Any, aug: "AugmentConfig", spec: ImageSpec) -> Any:
    """Random flip / pad-and-crop with stateless ops keyed by ``seed`` (reproducible).

    ``x`` is one image ``(h, w, c)`` (streaming: per element) or a batch ``(b, h, w, c)``
    (decoded cache: per batch, vectorised), which gets an independent draw per image.
    The batch flip is not ``tf.image.stateless_random_flip_left_right`` on the batch: that
    flips where its draw is above 0.5, this where it is below, and changing it would change
    which images are flipped for a given seed.
    """
    import tensorflow as tf

    batched = x.shape.rank == 4
    if aug.flip_left_right:
        if batched:
            flip = tf.random.stateless_uniform([tf.shape(x)[0]], seed=seed) < 0.5
            x = tf.where(flip[:, None, None, None], tf.reverse(x, axis=[2]), x)
        else:
            x = tf.image.stateless_random_flip_left_right(x, seed=seed)
    if aug.crop_pad > 0:
        p = aug.crop_pad
        # Zero padding after normalisation pads with the channel mean.
        x = tf.pad(x, ([[0, 0]] if batched else []) + [[p, p], [p, p], [0, 0]])
        crop_seed = seed[::-1] + 1
        if batched:
            seeds = tf.random.stateless_uniform([tf.shape(x)[0], 2], seed=crop_seed, minval=None, maxval=None,
                                                dtype=tf.int64)
            x = tf.map_fn(lambda a: tf.image.stateless_random_crop(a[0], size=spec.shape, seed=a[1]), (x, seeds),
                          fn_output_signature=tf.TensorSpec(spec.shape, x.dtype))
        else:
            x = tf.image.stateless_random_crop(x, size=spec.shape, seed=crop_seed)
    return x


def _augmenter(loader: "LoaderConfig", spec: ImageSpec, seed: int, rank: int) -> Callable[[Any, Any], Any]:
    """``(x, i) -> x`` augmented with draws keyed by element (or batch) index ``i``; identity when off."""
    import tensorflow as tf

    aug = loader.augment
    if not (aug.flip_left_right or aug.crop_pad > 0):
        return lambda x, i: x
    base = tf.constant(derived_seed(seed, rank, AUGMENT), tf.int64)
    return lambda x, i: augment(x, tf.stack([base, i]), aug, spec)


# --- the pipelines -------------------------------------------------------------------------

def _prefetch(ds: "tf.data.Dataset", loader: "LoaderConfig") -> "tf.data.Dataset":
    import tensorflow as tf

    return ds.prefetch(tf.data.AUTOTUNE if loader.prefetch < 0 else loader.prefetch)


def _cached_stream(ds: "tf.data.Dataset", source: ReaderSource, *, spec: ImageSpec, norm: Normalization,
                   loader: "LoaderConfig", batch_size: int, seed: int, rank: int) -> "tf.data.Dataset":
    """The training stream over the decoded cache (``ds``: one pass of encoded rows, already
    mixed by the shuffle buffer, so the first batch waits for bytes, not decoded images).

    The first pass is read from Parquet and decoded as it trains, keeping ``uint8`` pixels;
    every later pass is a fresh in-memory shuffle of the whole shard. Only the decode is
    per image: normalisation and augmentation run once per batch, vectorised.
    """
    import tensorflow as tf

    def decode_u8(*row: Any) -> Tuple[Any, ...]:
        return (tf.cast(tf_decode(row[0], spec), tf.uint8),) + row[1:]

    pixels = ds.map(decode_u8, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
    later = pixels.shuffle(max(1, source.layout.shard_rows(source.shard, source.shard_count)),
                           seed=derived_seed(seed, rank, SHUFFLE, 1), reshuffle_each_iteration=True)
    augmented = _augmenter(loader, spec, seed, rank)

    def batch_map(i: Any, batch: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x = tf_normalize(tf.cast(batch[0], tf.float32), norm)
        return (augmented(x, i),) + tuple(batch[1:])

    out = pixels.concatenate(later.repeat()).batch(batch_size, drop_remainder=True).enumerate()
    return _prefetch(out.map(batch_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), loader)


def build(source: ReaderSource, *, spec: ImageSpec, norm: Normalization, loader: "LoaderConfig",
          batch_size: int, train: bool, seed: int, rank: int, cached: bool = False) -> "tf.data.Dataset":
    """The batches of ``source``: ``(image, label[, image_id])``, one element per column it reads.

    Training: shuffled (buffer of encoded rows), augmented, full batches only, endless (or one
    pass into the decoded cache when ``cached``). Evaluation: file order, exact pixels, the last
    batch may be partial.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_generator(source, output_signature=_signature(source.columns))
    ds = ds.unbatch()
    if train and loader.shuffle_buffer > 1:
        # Mixes rows across row groups; holds encoded bytes, not decoded pixels.
        ds = ds.shuffle(loader.shuffle_buffer, seed=derived_seed(seed, rank, SHUFFLE),
                        reshuffle_each_iteration=False)
    if cached:
        return _cached_stream(ds, source, spec=spec, norm=norm, loader=loader, batch_size=batch_size,
                              seed=seed, rank=rank)

    def decode(image: Any) -> Any:
        return tf_normalize(tf_decode(image, spec), norm)

    if train:
        augmented = _augmenter(loader, spec, seed, rank)

        def train_map(i: Any, row: Tuple[Any, ...]) -> Tuple[Any, ...]:
            return (augmented(decode(row[0]), i),) + tuple(row[1:])

        ds = ds.enumerate().map(train_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        def eval_map(*row: Any) -> Tuple[Any, ...]:
            return (decode(row[0]),) + row[1:]

        ds = ds.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=False)
    return _prefetch(ds, loader)


def empty(spec: ImageSpec, columns: Sequence[str]) -> "tf.data.Dataset":
    """A dataset of no batches with the element structure :func:`build` gives (ranks beyond the row groups)."""
    import tensorflow as tf

    parts: List[Any] = [tf.zeros((0,) + spec.shape, tf.float32), tf.zeros((0,), tf.int32)]
    if ID_COLUMN in columns:
        parts.append(tf.zeros((0,), tf.string))
    return tf.data.Dataset.from_tensors(tuple(parts)).take(0)

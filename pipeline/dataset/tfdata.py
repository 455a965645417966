"""The ``tf.data`` side of the loader: decode, augment, normalise, batch -- streamed or from the decoded cache.

:func:`build` turns a :class:`~pipeline.dataset.reader.ReaderSource` into the dataset the
trainer iterates. Decoding (with the decompression-bomb header check) and normalisation are
:mod:`pipeline.imaging.stored`, shared with scoring. Every random draw (shuffle buffer,
augmentation) is keyed by a seed derived from ``(seed, rank, purpose)``, so the same seed
gives the same batches in the same order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Sequence, Tuple

from pipeline.dataset.reader import AUGMENT, ID_COLUMN, SHUFFLE, ReaderSource, derived_seed
from pipeline.imaging.stored import ImageSpec, Normalization, tf_decode_u8, tf_decode_window_u8, tf_normalize

#: What :func:`build` can hand out: normalised float32 images or the stored uint8 pixels.
PIXELS = ("float32", "uint8")

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

#: Offsets that give each augmentation its own draw from one ``(base, index)`` seed.
_RRC_SEED = (3, 0)


def crop_window(hw: Any, seed: Any, aug: "AugmentConfig") -> Tuple[Any, Any]:
    """``(begin (y, x), size (h, w))`` int32 of one random resized crop of an image of size ``hw``.

    Inception-style: a fraction ``aug.crop_scale`` of the area, aspect ratio in
    ``aug.crop_ratio``, always inside the image (the whole image when no draw fits).
    """
    import tensorflow as tf

    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([tf.cast(hw, tf.int32), [1]], 0), tf.zeros([1, 0, 4], tf.float32), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=tuple(aug.crop_ratio), area_range=tuple(aug.crop_scale),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin[:2], size[:2]


def _resize_to(x: Any, spec: ImageSpec, dtype: Any) -> Any:
    """A crop resized (bilinear) back to ``spec``'s size, as ``dtype`` (uint8: rounded and clipped)."""
    import tensorflow as tf

    y = tf.image.resize(x, (spec.height, spec.width), method="bilinear")
    if dtype == tf.uint8:
        return tf.cast(tf.clip_by_value(tf.round(y), 0.0, 255.0), tf.uint8)
    return y


def _rrc_seed(seed: Any) -> Any:
    import tensorflow as tf

    return seed + tf.constant(_RRC_SEED, tf.int64)


def resized_crop(x: Any, seed: Any, aug: "AugmentConfig", spec: ImageSpec) -> Any:
    """Random resized crop of decoded pixels: one image ``(h, w, c)`` or a batch, a draw per image."""
    import tensorflow as tf

    def one(img: Any, s: Any) -> Any:
        begin, size = crop_window(tf.shape(img)[:2], s, aug)
        win = tf.slice(img, tf.concat([begin, [0]], 0), tf.concat([size, [-1]], 0))
        return _resize_to(win, spec, img.dtype)

    if x.shape.rank == 3:
        return one(x, _rrc_seed(seed))
    seeds = tf.random.stateless_uniform([tf.shape(x)[0], 2], seed=_rrc_seed(seed), minval=None, maxval=None,
                                        dtype=tf.int64)
    return tf.map_fn(lambda a: one(a[0], a[1]), (x, seeds), fn_output_signature=tf.TensorSpec(spec.shape, x.dtype))


def augment(x: Any, seed: Any, aug: "AugmentConfig", spec: ImageSpec, pad_value: Sequence[int] = ()) -> Any:
    """Random flip / pad-and-crop with stateless ops keyed by ``seed`` (reproducible).

    ``x`` is one image ``(h, w, c)`` (streaming: per element) or a batch ``(b, h, w, c)``
    (decoded cache: per batch, vectorised), which gets an independent draw per image.
    The batch flip is not ``tf.image.stateless_random_flip_left_right`` on the batch: that
    flips where its draw is above 0.5, this where it is below, and changing it would change
    which images are flipped for a given seed. The padding is ``pad_value`` per channel
    (the channel mean: 0 after normalisation, the rounded mean on uint8 pixels); zeros when empty.
    The random resized crop is not here: :func:`resized_crop` runs before, on the decoded pixels.
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
        pads = ([[0, 0]] if batched else []) + [[p, p], [p, p], [0, 0]]
        padded = tf.pad(x, pads)
        if any(pad_value):
            border = tf.pad(tf.zeros_like(x[..., :1]), pads, constant_values=1)
            padded = padded + border * tf.constant(pad_value, x.dtype)
        x = padded
        crop_seed = seed[::-1] + 1
        if batched:
            seeds = tf.random.stateless_uniform([tf.shape(x)[0], 2], seed=crop_seed, minval=None, maxval=None,
                                                dtype=tf.int64)
            x = tf.map_fn(lambda a: tf.image.stateless_random_crop(a[0], size=spec.shape, seed=a[1]), (x, seeds),
                          fn_output_signature=tf.TensorSpec(spec.shape, x.dtype))
        else:
            x = tf.image.stateless_random_crop(x, size=spec.shape, seed=crop_seed)
    return x


def _seed_of(seed: int, rank: int, i: Any) -> Any:
    """The stateless seed of element (or batch) ``i`` of rank ``rank``'s stream: ``(base, i)``."""
    import tensorflow as tf

    return tf.stack([tf.constant(derived_seed(seed, rank, AUGMENT), tf.int64), tf.cast(i, tf.int64)])


def _augmenter(loader: "LoaderConfig", spec: ImageSpec, seed: int, rank: int,
               pad_value: Sequence[int] = ()) -> Callable[[Any, Any], Any]:
    """``(x, i) -> x`` flipped / padded-and-cropped with draws keyed by element (or batch) index ``i``."""
    aug = loader.augment
    if not (aug.flip_left_right or aug.crop_pad > 0):
        return lambda x, i: x
    return lambda x, i: augment(x, _seed_of(seed, rank, i), aug, spec, pad_value)


def _u8_pad_value(norm: Normalization) -> Tuple[int, ...]:
    """The channel means as uint8 pixel values: what padding a uint8 image with "the mean" means."""
    return tuple(int(min(255, max(0, round(m)))) for m in norm.mean)


# --- the pipelines -------------------------------------------------------------------------

def _prefetch(ds: "tf.data.Dataset", loader: "LoaderConfig") -> "tf.data.Dataset":
    import tensorflow as tf

    return ds.prefetch(tf.data.AUTOTUNE if loader.prefetch < 0 else loader.prefetch)


def _cached_stream(ds: "tf.data.Dataset", source: ReaderSource, *, spec: ImageSpec, norm: Normalization,
                   loader: "LoaderConfig", batch_size: int, seed: int, rank: int,
                   pixels: str) -> "tf.data.Dataset":
    """The training stream over the decoded cache (``ds``: one pass of encoded rows, already
    mixed by the shuffle buffer, so the first batch waits for bytes, not decoded images).

    The first pass is read from Parquet and decoded as it trains, keeping ``uint8`` pixels;
    every later pass is a fresh in-memory shuffle of the whole shard. Only the decode is
    per image: the crop, normalisation and augmentation run once per batch, vectorised.
    """
    import tensorflow as tf

    def decode_u8(*row: Any) -> Tuple[Any, ...]:
        return (tf_decode_u8(row[0], spec),) + row[1:]

    cached = ds.map(decode_u8, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
    later = cached.shuffle(max(1, source.layout.shard_rows(source.shard, source.shard_count)),
                           seed=derived_seed(seed, rank, SHUFFLE, 1), reshuffle_each_iteration=True)
    u8 = pixels == "uint8"
    augmented = _augmenter(loader, spec, seed, rank, _u8_pad_value(norm) if u8 else ())
    rrc = loader.augment.random_resized_crop

    def batch_map(i: Any, batch: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x = batch[0]
        if rrc:
            x = resized_crop(x if u8 else tf.cast(x, tf.float32), _seed_of(seed, rank, i), loader.augment, spec)
        if not u8:
            x = tf_normalize(tf.cast(x, tf.float32), norm)
        return (augmented(x, i),) + tuple(batch[1:])

    out = cached.concatenate(later.repeat()).batch(batch_size, drop_remainder=True).enumerate()
    return _prefetch(out.map(batch_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), loader)


def build(source: ReaderSource, *, spec: ImageSpec, norm: Normalization, loader: "LoaderConfig",
          batch_size: int, train: bool, seed: int, rank: int, cached: bool = False,
          pixels: str = "float32") -> "tf.data.Dataset":
    """The batches of ``source``: ``(image, label[, image_id])``, one element per column it reads.

    Training: shuffled (buffer of encoded rows), augmented, full batches only, endless (or one
    pass into the decoded cache when ``cached``). Evaluation: file order, exact pixels, the last
    batch may be partial. ``pixels``: ``float32`` = normalised images; ``uint8`` = the decoded
    (and augmented) pixels as stored, for a model step that normalises on its device
    (:func:`model_input`): a quarter of the bytes to move, no float work on the host.
    """
    import tensorflow as tf

    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
    ds = tf.data.Dataset.from_generator(source, output_signature=_signature(source.columns))
    ds = ds.unbatch()
    if train and loader.shuffle_buffer > 1:
        # Mixes rows across row groups; holds encoded bytes, not decoded pixels.
        ds = ds.shuffle(loader.shuffle_buffer, seed=derived_seed(seed, rank, SHUFFLE),
                        reshuffle_each_iteration=False)
    if cached:
        return _cached_stream(ds, source, spec=spec, norm=norm, loader=loader, batch_size=batch_size,
                              seed=seed, rank=rank, pixels=pixels)
    u8 = pixels == "uint8"

    def finish(x: Any) -> Any:
        return x if u8 else tf_normalize(tf.cast(x, tf.float32), norm)

    if train:
        augmented = _augmenter(loader, spec, seed, rank, _u8_pad_value(norm) if u8 else ())
        aug = loader.augment

        def train_map(i: Any, row: Tuple[Any, ...]) -> Tuple[Any, ...]:
            if aug.random_resized_crop:
                # Decode only the crop's window (JPEG), then resize it to the stored size.
                s = _rrc_seed(_seed_of(seed, rank, i))
                shape = (tf.image.extract_jpeg_shape(row[0])[:2] if spec.format == "jpeg"
                         else tf.constant([spec.height, spec.width], tf.int32))
                begin, size = crop_window(shape, s, aug)
                win = tf_decode_window_u8(row[0], spec, begin, size)
                x = _resize_to(win, spec, tf.uint8 if u8 else tf.float32)
            else:
                x = tf_decode_u8(row[0], spec)
            return (augmented(finish(x), i),) + tuple(row[1:])

        ds = ds.enumerate().map(train_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        def eval_map(*row: Any) -> Tuple[Any, ...]:
            return (finish(tf_decode_u8(row[0], spec)),) + row[1:]

        ds = ds.map(eval_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=False)
    return _prefetch(ds, loader)


def model_input(x: Any, norm: Normalization) -> Any:
    """What the model takes from a batch :func:`build` gave: uint8 pixels normalised to float32
    (run it inside the compiled step, so it runs on the accelerator); float32 batches as they are."""
    import tensorflow as tf

    if x.dtype == tf.uint8:
        return tf_normalize(tf.cast(x, tf.float32), norm)
    return x


def empty(spec: ImageSpec, columns: Sequence[str], pixels: str = "float32") -> "tf.data.Dataset":
    """A dataset of no batches with the element structure :func:`build` gives (ranks beyond the row groups)."""
    import tensorflow as tf

    parts: List[Any] = [tf.zeros((0,) + spec.shape, tf.uint8 if pixels == "uint8" else tf.float32),
                        tf.zeros((0,), tf.int32)]
    if ID_COLUMN in columns:
        parts.append(tf.zeros((0,), tf.string))
    return tf.data.Dataset.from_tensors(tuple(parts)).take(0)

"""``<model_dir>/model/saved_model/``: the exported model as a TensorFlow SavedModel for serving systems.

:func:`export_saved_model` writes it with Keras 3's ``keras.export.ExportArchive`` (what
``model.export`` uses) and two explicit signatures:

* ``serving_default``: ``image_bytes`` (string ``[N]``: PNG or JPEG bytes, as ingest stores them)
  -> ``probabilities`` (float32 ``[N, classes]``). The graph does what scoring does before the
  model: decode to the model's channels, float32 0..255, ``(x - mean) / std`` with the model
  card's normalisation. Bytes of another size are resized (bilinear, stretched) to the model's
  size; ingest's own resize policies (crop, pad) run only at ingest, so only stored bytes give
  exactly scoring's predictions.
* ``serving_pixels``: ``pixels`` (float32 ``[N, h, w, c]``, 0..255) -> ``probabilities``.

Before decoding, the byte signature reads the PNG/JPEG header and refuses images with more
than ``max_pixels`` pixels (a decompression bomb), as every other decode path of pixelmill does.
Loading needs TensorFlow only (``tf.saved_model.load``), not Keras or pixelmill.
"""
from __future__ import annotations

from typing import Any

from pipeline.imaging.stored import ImageSpec, Normalization

#: The signature names and their input / output keys (docs/contracts.md).
BYTES_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "serving_pixels"
BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "pixels"
OUTPUT = "probabilities"


def _header_pixels(image: Any) -> Any:
    """Pixels the PNG / JPEG header announces (int64; 0 for any other format, which decode then refuses)."""
    import tensorflow as tf

    def png() -> Any:
        wh = tf.io.decode_raw(tf.strings.substr(image, 16, 8), tf.int32, little_endian=False)
        return tf.cast(wh[0], tf.int64) * tf.cast(wh[1], tf.int64)

    def jpeg() -> Any:
        hw = tf.cast(tf.image.extract_jpeg_shape(image)[:2], tf.int64)
        return hw[0] * hw[1]

    is_png = tf.equal(tf.strings.substr(image, 0, 8), b"\x89PNG\r\n\x1a\n")
    return tf.cond(is_png, png, lambda: tf.cond(tf.io.is_jpeg(image), jpeg, lambda: tf.constant(0, tf.int64)))


def serving_functions(model: Any, spec: ImageSpec, norm: Normalization, *, max_pixels: int) -> Any:
    """``(from_bytes, from_pixels)``: the two signatures' functions around ``model``."""
    import tensorflow as tf

    mean, std = tf.constant(norm.mean, tf.float32), tf.constant(norm.std, tf.float32)
    size = tf.constant([spec.height, spec.width], tf.int32)

    def decode(image: Any) -> Any:
        check = tf.debugging.assert_less_equal(
            _header_pixels(image), tf.constant(max_pixels, tf.int64),
            message=f"image has more than {max_pixels} pixels (or is not a PNG/JPEG)")
        with tf.control_dependencies([check]):
            x = tf.io.decode_image(image, channels=spec.channels, expand_animations=False)
        x = tf.cast(x, tf.float32)
        same = tf.reduce_all(tf.equal(tf.shape(x)[:2], size))
        x = tf.cond(same, lambda: x, lambda: tf.image.resize(x, size, method="bilinear"))
        return tf.ensure_shape(x, spec.shape)

    def from_pixels(pixels: Any) -> Any:
        return {OUTPUT: tf.cast(model((pixels - mean) / std, training=False), tf.float32)}

    def from_bytes(images: Any) -> Any:
        pixels = tf.map_fn(decode, images, fn_output_signature=tf.TensorSpec(spec.shape, tf.float32))
        return from_pixels(pixels)

    return from_bytes, from_pixels


def export_saved_model(model: Any, path: str, spec: ImageSpec, norm: Normalization, *, max_pixels: int) -> None:
    """Write the SavedModel of ``model`` into the local folder ``path`` (see the module docstring)."""
    import tensorflow as tf
    from keras.export import ExportArchive

    from_bytes, from_pixels = serving_functions(model, spec, norm, max_pixels=max_pixels)
    archive = ExportArchive()
    archive.track(model)
    archive.add_endpoint(BYTES_SIGNATURE, from_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    archive.add_endpoint(PIXELS_SIGNATURE, from_pixels,
                         input_signature=[tf.TensorSpec((None,) + spec.shape, tf.float32, name=PIXELS_INPUT)])
    archive.write_out(path, verbose=False)


def serving_card() -> dict:
    """The model card's ``serving`` entry: where the SavedModel is and what its signatures take and return."""
    from pipeline.contracts import MODEL_SUBDIR, SAVED_MODEL_DIR

    return {"saved_model": f"{MODEL_SUBDIR}/{SAVED_MODEL_DIR}", "output": OUTPUT,
            "signatures": {BYTES_SIGNATURE: {"input": BYTES_INPUT, "dtype": "string", "shape": [None]},
                           PIXELS_SIGNATURE: {"input": PIXELS_INPUT, "dtype": "float32",
                                              "shape": [None, "height", "width", "channels"]}}}

"""Decode and normalise stored image bytes: one implementation for training and scoring.

The loader (:mod:`pipeline.dataset`) uses the TensorFlow functions inside
``tf.data``; scoring (:mod:`pipeline.score`) uses the numpy batch function in
Spark's Python workers. Both check the encoded header against the expected size
*before* decoding, so a decompression bomb planted in the Parquet is refused in
every decode path, not only at ingest.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from pipeline.errors import DataError


@dataclass(frozen=True)
class ImageSpec:
    """What every stored image is: size, channels and encoding (from the ingest manifest)."""

    height: int
    width: int
    channels: int
    format: str = "png"

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "ImageSpec":
        img = manifest["image"]
        return cls(int(img["height"]), int(img["width"]), int(img["channels"]), str(img.get("format", "png")))

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.height, self.width, self.channels)


@dataclass(frozen=True)
class Normalization:
    """``(x - mean) / std`` per channel, on pixel values in 0..255."""

    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @classmethod
    def from_mode(cls, mode: str, manifest: Optional[Mapping[str, Any]], channels: int) -> "Normalization":
        if mode == "none":
            return cls((0.0,) * channels, (1.0,) * channels)
        if mode == "unit":
            return cls((0.0,) * channels, (255.0,) * channels)
        if mode == "manifest":
            stats = (manifest or {}).get("stats") or {}
            mean, std = stats.get("mean"), stats.get("std")
            if not mean or not std or len(mean) != channels or len(std) != channels:
                raise DataError(
                    "the ingest manifest has no per-channel stats.mean/stats.std: "
                    "re-run ingest, or set loader.normalize=unit"
                )
            return cls(tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std))
        raise DataError(f"unknown normalization mode {mode!r}")

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalization":
        return cls(tuple(float(x) for x in d["mean"]), tuple(float(x) for x in d["std"]))


# --- headers: size before decode --------------------------------------------

def header_size(data: bytes) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from a PNG or JPEG header without decoding pixels, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:2] == b"\xff\xd8":
        i = 2
        n = len(data)
        while i + 9 < n:
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", data[i + 5:i + 9])
                return int(w), int(h)
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            seg = struct.unpack(">H", data[i + 2:i + 4])[0]
            i += 2 + seg
        return None
    return None


def check_header(data: bytes, spec: ImageSpec) -> None:
    """Raise DataError unless the encoded header says exactly ``spec``'s size."""
    size = header_size(data)
    if size is None:
        raise DataError(f"stored image is not a readable {spec.format.upper()} (re-run ingest)")
    if size != (spec.width, spec.height):
        raise DataError(
            f"stored image is {size[0]}x{size[1]}, expected {spec.width}x{spec.height}: "
            "the data was not written by this ingest (re-run ingest)"
        )


#: PNG signature + IHDR chunk header: the first 16 bytes of every well-formed PNG.
_PNG_PREFIX = np.frombuffer(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", dtype=np.uint8)
#: IHDR colour type of an 8-bit PNG with 1 (greyscale) or 3 (truecolour) channels.
_PNG_COLOR_TYPE = {1: 0, 3: 2}


def png_headers_match(data: np.ndarray, offsets: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Vectorised :func:`check_header` for a batch of PNGs held in one buffer (Arrow binary layout).

    ``data`` is the uint8 buffer and ``offsets`` the ``n + 1`` start offsets of the images in it.
    True where the IHDR says exactly ``spec``: width, height, 8 bits, ``spec.channels`` channels
    (no palette, no alpha). Only those may be decoded without further checks; the others must
    go through :func:`check_header` / :func:`decode_batch` one at a time (bombs, other sizes,
    other colour types, not a PNG at all).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    ok = np.zeros(n, dtype=bool)
    color = _PNG_COLOR_TYPE.get(spec.channels)
    if n <= 0 or color is None or spec.format != "png" or len(data) < 29:
        return ok
    starts = offsets[:-1]
    ok = (offsets[1:] - starts) >= 29
    idx = np.where(ok, starts, 0)[:, None] + np.arange(29)
    hdr = np.asarray(data, dtype=np.uint8)[np.minimum(idx, len(data) - 1)]
    be = np.array([1 << 24, 1 << 16, 1 << 8, 1], dtype=np.int64)
    width = hdr[:, 16:20].astype(np.int64) @ be
    height = hdr[:, 20:24].astype(np.int64) @ be
    return (ok & (hdr[:, :16] == _PNG_PREFIX).all(axis=1) & (width == spec.width) & (height == spec.height)
            & (hdr[:, 24] == 8) & (hdr[:, 25] == color))


# --- numpy path (scoring) -----------------------------------------------------

def decode_batch(images: Sequence[bytes], spec: ImageSpec) -> np.ndarray:
    """Decode encoded images into a float32 ``(n, h, w, c)`` array of 0..255 values."""
    from PIL import Image

    out = np.empty((len(images),) + spec.shape, dtype=np.float32)
    for i, data in enumerate(images):
        check_header(data, spec)
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape != spec.shape:
            raise DataError(f"decoded image has shape {arr.shape}, expected {spec.shape} (re-run ingest)")
        out[i] = arr
    return out


def normalize_np(x: np.ndarray, norm: Normalization) -> np.ndarray:
    return (x - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)


# --- TensorFlow path (training) -----------------------------------------------

def tf_decode(image: Any, spec: ImageSpec, max_pixels: Optional[int] = None) -> Any:
    """Decode one encoded image tensor into float32 ``(h, w, c)`` with 0..255 values.

    The PNG/JPEG header is checked before the pixels are decoded: more than ``max_pixels``
    (default: the manifest's ``h x w``) is a decompression bomb, any other size than ``spec``'s
    is data this ingest did not write. Both fail with a message that says to re-run ingest.
    """
    import tensorflow as tf

    limit = int(max_pixels or spec.height * spec.width)
    expected_hw = tf.constant([spec.height, spec.width], tf.int64)
    if spec.format == "png":
        wh = tf.io.decode_raw(tf.strings.substr(image, 16, 8), tf.int32, little_endian=False)
        hw = tf.cast(tf.stack([wh[1], wh[0]]), tf.int64)
    else:
        hw = tf.cast(tf.image.extract_jpeg_shape(image)[:2], tf.int64)
    kind = spec.format.upper()
    checks = [
        tf.debugging.assert_less_equal(
            hw[0] * hw[1], tf.constant(limit, tf.int64),
            message=f"stored {kind} is larger than the image size in the manifest (re-run ingest)"),
        # Any other size fails later anyway; say why here, before decoding.
        tf.debugging.assert_equal(
            hw, expected_hw,
            message=f"stored {kind} is not {spec.height}x{spec.width} as the manifest says (re-run ingest)"),
    ]
    with tf.control_dependencies(checks):
        if spec.format == "png":
            x = tf.io.decode_png(image, channels=spec.channels)
        else:
            x = tf.io.decode_jpeg(image, channels=spec.channels)
    x = tf.ensure_shape(x, spec.shape)
    return tf.cast(x, tf.float32)


def tf_normalize(x: Any, norm: Normalization) -> Any:
    import tensorflow as tf

    return (x - tf.constant(norm.mean, tf.float32)) / tf.constant(norm.std, tf.float32)

"""Stored image bytes read back: one implementation for the loader and for scoring.

The loader (:mod:`pipeline.dataset`) uses the TensorFlow functions inside ``tf.data``;
scoring (:mod:`pipeline.score`) decodes Arrow batches in Spark's Python workers with
:func:`decode_images`. Every path checks the encoded header against the expected size
*before* decoding, so a decompression bomb planted in the Parquet is refused in every
decode path, not only at ingest. Rows that cannot be decoded get a reason from
:mod:`pipeline.imaging.reasons`, chosen by which check failed.
"""
from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from pipeline.errors import DataError
from pipeline.imaging.reasons import UNDECODABLE, WRONG_SHAPE, WRONG_SIZE


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

#: JPEG start-of-frame markers (every coding; 0xC4, 0xC8 and 0xCC are other segments).
_JPEG_FRAMES = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def _jpeg_frame(data: bytes) -> Optional[Tuple[int, int, int, int, int]]:
    """``(marker, width, height, components, precision)`` of a JPEG's start-of-frame segment, else None.

    Walks the marker segments from the start of the image up to the frame header (tens of
    bytes), skipping stray bytes between segments; no pixels are decoded.
    """
    i = 2
    n = len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in _JPEG_FRAMES:
            precision, h, w, comps = struct.unpack(">BHHB", data[i + 4:i + 10])
            return int(marker), int(w), int(h), int(comps), int(precision)
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg = struct.unpack(">H", data[i + 2:i + 4])[0]
        i += 2 + seg
    return None


def header_size(data: bytes) -> Optional[Tuple[int, int]]:
    """``(width, height)`` from a PNG or JPEG header without decoding pixels, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if data[:2] == b"\xff\xd8":
        frame = _jpeg_frame(data)
        return (frame[1], frame[2]) if frame is not None else None
    return None


def header_problem(data: bytes, spec: ImageSpec) -> Optional[Tuple[str, str]]:
    """``None`` when the encoded header says exactly ``spec``'s size, else ``(reason, detail)``."""
    size = header_size(data)
    if size is None:
        return UNDECODABLE, f"stored image is not a readable {spec.format.upper()} (re-run ingest)"
    if size != (spec.width, spec.height):
        return WRONG_SIZE, (f"stored image is {size[0]}x{size[1]}, expected {spec.width}x{spec.height}: "
                            "the data was not written by this ingest (re-run ingest)")
    return None


def check_header(data: bytes, spec: ImageSpec) -> None:
    """Raise DataError unless the encoded header says exactly ``spec``'s size."""
    problem = header_problem(data, spec)
    if problem is not None:
        raise DataError(problem[1])


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


#: The frames the fast path takes: baseline, extended and progressive Huffman coding (what
#: libjpeg decodes); arithmetic coding and lossless go row by row through Pillow.
_JPEG_FAST_FRAMES = (0xC0, 0xC1, 0xC2)


def jpeg_headers_match(blobs: Sequence[Optional[bytes]], spec: ImageSpec) -> np.ndarray:
    """:func:`png_headers_match` for JPEGs: True where the frame header (:func:`_jpeg_frame`,
    the walk :func:`header_size` does) says exactly ``spec``: size, 8-bit, ``spec.channels``
    components, a frame type the fast decoder takes."""
    ok = np.zeros(len(blobs), dtype=bool)
    if spec.format != "jpeg":
        return ok
    want = (spec.width, spec.height, spec.channels, 8)
    for i, b in enumerate(blobs):
        frame = _jpeg_frame(b) if b is not None and b[:2] == b"\xff\xd8" else None
        ok[i] = frame is not None and frame[0] in _JPEG_FAST_FRAMES and frame[1:] == want
    return ok


# --- numpy path (scoring) -----------------------------------------------------

def decode_one(data: bytes, spec: ImageSpec) -> Tuple[Optional[np.ndarray], Optional[Tuple[str, str]]]:
    """Header check, then Pillow: ``(float32 (h, w, c) 0..255 pixels, None)`` or ``(None, (reason, detail))``."""
    from PIL import Image

    problem = header_problem(data, spec)
    if problem is not None:
        return None, problem
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - a body that does not decode is a reject, never a crash
        return None, (UNDECODABLE, (str(e).strip().splitlines() or [type(e).__name__])[0][:500])
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != spec.shape:
        return None, (WRONG_SHAPE, f"decoded image has shape {arr.shape}, expected {spec.shape} (re-run ingest)")
    return arr.astype(np.float32), None


def decode_batch(images: Sequence[bytes], spec: ImageSpec) -> np.ndarray:
    """Decode encoded images into a float32 ``(n, h, w, c)`` array of 0..255 values; DataError on a bad one."""
    out = np.empty((len(images),) + spec.shape, dtype=np.float32)
    for i, data in enumerate(images):
        pixels, problem = decode_one(data, spec)
        if problem is not None:
            raise DataError(problem[1])
        out[i] = pixels
    return out


def normalize_np(x: np.ndarray, norm: Normalization) -> np.ndarray:
    return (x - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)


# --- TensorFlow path (training) -----------------------------------------------

#: libjpeg's accurate integer IDCT: the pixels Pillow decodes (scoring's fallback, ingest's stats),
#: bit for bit. TensorFlow's default (the fast IDCT) differs from Pillow on nearly every image.
JPEG_DCT = "INTEGER_ACCURATE"


def _header_checks(image: Any, spec: ImageSpec) -> List[Any]:
    """Assertions on the encoded header: no more than ``spec``'s pixels (the bomb guard), exactly its size."""
    import tensorflow as tf

    limit = int(spec.height * spec.width)
    expected_hw = tf.constant([spec.height, spec.width], tf.int64)
    if spec.format == "png":
        wh = tf.io.decode_raw(tf.strings.substr(image, 16, 8), tf.int32, little_endian=False)
        hw = tf.cast(tf.stack([wh[1], wh[0]]), tf.int64)
    else:
        hw = tf.cast(tf.image.extract_jpeg_shape(image)[:2], tf.int64)
    kind = spec.format.upper()
    return [
        tf.debugging.assert_less_equal(
            hw[0] * hw[1], tf.constant(limit, tf.int64),
            message=f"stored {kind} is larger than the image size in the manifest (re-run ingest)"),
        # Any other size fails later anyway; say why here, before decoding.
        tf.debugging.assert_equal(
            hw, expected_hw,
            message=f"stored {kind} is not {spec.height}x{spec.width} as the manifest says (re-run ingest)"),
    ]


def tf_decode_u8(image: Any, spec: ImageSpec) -> Any:
    """Decode one encoded image tensor into uint8 ``(h, w, c)``, header checked first.

    The PNG/JPEG header is checked before the pixels are decoded: more than the manifest's
    ``h x w`` pixels is a decompression bomb, any other size than ``spec``'s
    is data this ingest did not write. Both fail with a message that says to re-run ingest.
    """
    import tensorflow as tf

    with tf.control_dependencies(_header_checks(image, spec)):
        if spec.format == "png":
            x = tf.io.decode_png(image, channels=spec.channels)
        else:
            x = tf.io.decode_jpeg(image, channels=spec.channels, dct_method=JPEG_DCT)
    return tf.ensure_shape(x, spec.shape)


def tf_decode(image: Any, spec: ImageSpec) -> Any:
    """:func:`tf_decode_u8` as float32 0..255 values."""
    import tensorflow as tf

    return tf.cast(tf_decode_u8(image, spec), tf.float32)


def tf_decode_window_u8(image: Any, spec: ImageSpec, begin: Any, size: Any) -> Any:
    """The uint8 pixels of the window ``begin`` (y, x) / ``size`` (h, w) of one encoded image.

    JPEG decodes only the window (``decode_and_crop_jpeg``: the rows above and the blocks
    beside it are skipped); PNG has no partial decode, so it decodes the image and slices.
    The header checks of :func:`tf_decode_u8` come first either way.
    """
    import tensorflow as tf

    with tf.control_dependencies(_header_checks(image, spec)):
        if spec.format == "jpeg":
            window = tf.stack([begin[0], begin[1], size[0], size[1]])
            x = tf.io.decode_and_crop_jpeg(image, window, channels=spec.channels, dct_method=JPEG_DCT)
        else:
            x = tf.slice(tf.io.decode_png(image, channels=spec.channels), tf.concat([begin, [0]], 0),
                         tf.concat([size, [spec.channels]], 0))
    return tf.ensure_shape(x, [None, None, spec.channels])


def tf_normalize(x: Any, norm: Normalization) -> Any:
    import tensorflow as tf

    return (x - tf.constant(norm.mean, tf.float32)) / tf.constant(norm.std, tf.float32)


# --- Arrow batches (scoring) ---------------------------------------------------

#: Per-Python-worker cache: ImageSpec -> compiled batch decoder.
_WORKER_DECODERS: Dict["ImageSpec", Any] = {}


def worker_decoder(spec: ImageSpec) -> Any:
    """A ``tf.function`` decoding a batch of encoded images to float32 ``(n, h, w, c)`` 0..255 pixels.

    Only for images whose header :func:`png_headers_match` / :func:`jpeg_headers_match` accepted
    (exact size, 8-bit, ``spec.channels``): the bomb check happens before, on the whole batch.
    """
    hit = _WORKER_DECODERS.get(spec)
    if hit is not None:
        return hit
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string)])
    def decode(images: Any) -> Any:
        def one(b: Any) -> Any:
            if spec.format == "png":
                x = tf.io.decode_png(b, channels=spec.channels)
            else:
                x = tf.io.decode_jpeg(b, channels=spec.channels, dct_method=JPEG_DCT)
            return tf.ensure_shape(x, spec.shape)

        pixels = tf.map_fn(one, images, fn_output_signature=tf.TensorSpec(spec.shape, tf.uint8))
        return tf.cast(pixels, tf.float32)

    _WORKER_DECODERS[spec] = decode
    return decode


def _binary_layout(arr: Any) -> Tuple[Any, Any, Any]:
    """``(data, offsets, valid)`` numpy views of an Arrow binary array (no copy of the bytes)."""
    import numpy as np
    import pyarrow as pa

    n = len(arr)
    valid = np.ones(n, dtype=bool) if arr.null_count == 0 else ~np.asarray(arr.is_null())
    _, off_buf, data_buf = arr.buffers()
    off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, dtype=off_type)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return data, offsets, valid


def decode_images(images: Any, spec: ImageSpec) -> Tuple[Any, Any, Dict[int, Tuple[str, str]]]:
    """Decode an Arrow binary array: ``(pixels of the good rows, good mask, {row: (reason, detail)})``.

    Images whose header says exactly ``spec`` (PNG: checked for the whole batch at once; JPEG:
    frame header parsed per image; the decompression-bomb guard) are decoded in one TensorFlow
    call, JPEGs with the IDCT Pillow uses, so both paths give the same pixels; everything else,
    and a batch the fast decoder refuses, goes through :func:`decode_one` row by row, which
    finds the reason.
    """
    import numpy as np

    n = len(images)
    data, offsets, valid = _binary_layout(images)
    blobs = images.to_pylist()
    if spec.format == "jpeg":
        fast = jpeg_headers_match(blobs, spec) & valid
    else:
        fast = png_headers_match(data, offsets, spec) & valid
    if fast.all():
        try:
            return worker_decoder(spec)(blobs), np.ones(n, dtype=bool), {}
        except Exception:  # noqa: BLE001 - a body that does not decode: find it row by row
            fast[:] = False
    pixels = np.zeros((n,) + spec.shape, dtype=np.float32)
    if fast.any():
        rows = np.flatnonzero(fast)
        try:
            pixels[rows] = worker_decoder(spec)([blobs[i] for i in rows]).numpy()
        except Exception:  # noqa: BLE001
            fast[:] = False
    errors: Dict[int, Tuple[str, str]] = {}
    for i in np.flatnonzero(~fast):
        px, err = decode_one(bytes(blobs[i]) if blobs[i] is not None else b"", spec)
        if err is None:
            pixels[i] = px
        else:
            errors[int(i)] = err
    good = np.ones(n, dtype=bool)
    good[list(errors)] = False
    return pixels[good], good, errors

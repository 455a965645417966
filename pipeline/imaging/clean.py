"""Ingest's per-file work on raw bytes, free of Spark: validate, normalise, resize, re-encode.

Everything the ingest job does to one file's pixels lives here as pure functions of
``bytes`` + options, so it is unit-testable without a JVM and the benchmark's
plain-Python baseline runs exactly the same code as the Spark job.

Checks run in this order; the first one that fails names the reject reason
(:mod:`pipeline.imaging.reasons`; the table is in ``docs/ingest.md``):

1. ``bad_extension``   - the extension is not in ``ingest.image_extensions``
2. ``empty``           - zero bytes
3. ``not_an_image``    - no decoder recognises the bytes
4. ``decompression_bomb`` - header says more than ``ingest.max_pixels`` pixels
   (checked on the header, before any pixel is decoded)
5. ``too_small``       - a side is shorter than ``ingest.min_side``
6. ``animated``        - more than one frame and ``ingest.animated: reject``
7. ``corrupt``         - the full decode fails (truncated, bad checksum, ...)
8. ``quality_flag``    - a quality flag named in ``ingest.reject_flags`` is raised

Every accepted image also gets its 64-bit perceptual hash and its quality flags
(:mod:`pipeline.imaging.quality`), measured on the stored pixels in the same pass.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Sequence, Tuple

import numpy as np

from pipeline.imaging import quality
from pipeline.imaging.reasons import (
    ANIMATED, BAD_EXTENSION, CORRUPT, DECOMPRESSION_BOMB, EMPTY, NOT_AN_IMAGE, QUALITY_FLAG, TOO_SMALL,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image as PILImage

    from pipeline.config import IngestConfig


@dataclass(frozen=True)
class ImageOptions:
    """The per-image part of :class:`pipeline.config.IngestConfig`, picklable and Spark-free."""

    height: int = 64
    width: int = 64
    color_mode: str = "RGB"
    resize_policy: str = "center_crop"
    encode_format: str = "png"
    jpeg_quality: int = 95
    jpeg_reduced_decode: bool = True
    png_compress_level: int = 1
    min_side: int = 8
    max_pixels: int = 40_000_000
    animated: str = "first_frame"
    image_extensions: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
    alpha_background: int = 255
    pad_value: int = 0
    thresholds: quality.QualityThresholds = quality.QualityThresholds()
    reject_flags: Tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: "IngestConfig") -> "ImageOptions":
        return cls(
            height=cfg.height, width=cfg.width, color_mode=cfg.color_mode, resize_policy=cfg.resize_policy,
            encode_format=cfg.encode_format, jpeg_quality=cfg.jpeg_quality,
            jpeg_reduced_decode=cfg.jpeg_reduced_decode, png_compress_level=cfg.png_compress_level,
            min_side=cfg.min_side,
            max_pixels=cfg.max_pixels, animated=cfg.animated, image_extensions=tuple(cfg.image_extensions),
            alpha_background=cfg.alpha_background, pad_value=cfg.pad_value,
            thresholds=quality.QualityThresholds(**cfg.quality.model_dump()), reject_flags=tuple(cfg.reject_flags),
        )

    @property
    def channels(self) -> int:
        return 3 if self.color_mode == "RGB" else 1


@dataclass(frozen=True)
class Cleaned:
    """An accepted image: the stored bytes and per-channel pixel sums for the manifest stats."""

    image: bytes
    height: int
    width: int
    channels: int
    format: str
    pixel_sum: Tuple[float, ...]
    pixel_sumsq: Tuple[float, ...]
    pixel_count: int
    phash: int = 0  #: :func:`pipeline.imaging.quality.phash` of the stored pixels
    flags: Tuple[str, ...] = ()  #: :data:`pipeline.imaging.quality.FLAGS` raised


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


# --- identity and extension ---------------------------------------------------

def image_id(data: bytes) -> str:
    """sha256 of the original bytes, hex: the identity of an image across runs and appends."""
    return hashlib.sha256(data).hexdigest()


def extension(path: str) -> str:
    """Lower-case extension of the file name in ``path`` (``''`` when none)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


# --- the per-image pipeline ----------------------------------------------------

def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0]}" if s else type(e).__name__


def _target_fit(w: int, h: int, opts: ImageOptions, swap: bool) -> Tuple[int, int]:
    """The smallest decode size (w, h) that still covers the target after the resize policy."""
    tw, th = (opts.height, opts.width) if swap else (opts.width, opts.height)
    if opts.resize_policy == "stretch":
        return tw, th
    s = max(tw / w, th / h) if opts.resize_policy == "center_crop" else min(tw / w, th / h)
    return max(1, math.ceil(w * s)), max(1, math.ceil(h * s))


def _to_mode(im: "PILImage", opts: ImageOptions) -> "PILImage":
    """Convert any Pillow mode to the configured RGB or L, deliberately per source kind."""
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer: scale the 0..65535 range to 0..255 (Pillow's convert would clip).
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    if im.mode in ("RGBA", "LA"):
        # Transparency is flattened onto a configured background, never dropped silently.
        arr = np.asarray(im, dtype=np.float32)
        alpha = arr[..., -1:] / 255.0
        flat = arr[..., :-1] * alpha + float(opts.alpha_background) * (1.0 - alpha)
        flat = np.clip(np.rint(flat), 0, 255).astype(np.uint8)
        im = Image.fromarray(flat if im.mode == "RGBA" else flat[..., 0], "RGB" if im.mode == "RGBA" else "L")
    if im.mode not in ("RGB", "L"):  # CMYK, YCbCr, LAB, HSV, ...
        im = im.convert("RGB")
    if im.mode != opts.color_mode:
        im = im.convert(opts.color_mode)
    return im


def _resize(im: "PILImage", opts: ImageOptions) -> "PILImage":
    from PIL import Image

    tw, th = opts.width, opts.height
    w, h = im.size
    resample = Image.Resampling.LANCZOS
    if opts.resize_policy == "stretch" or (w, h) == (tw, th):
        return im if (w, h) == (tw, th) else im.resize((tw, th), resample, reducing_gap=3.0)
    if opts.resize_policy == "center_crop":
        s = max(tw / w, th / h)
        cw, ch = tw / s, th / s  # the source box with the target's aspect ratio
        left, top = (w - cw) / 2.0, (h - ch) / 2.0
        return im.resize((tw, th), resample, box=(left, top, left + cw, top + ch), reducing_gap=3.0)
    # pad: fit inside, then center on a pad_value canvas
    s = min(tw / w, th / h)
    nw, nh = max(1, min(tw, round(w * s))), max(1, min(th, round(h * s)))
    inner = im.resize((nw, nh), resample, reducing_gap=3.0) if (nw, nh) != (w, h) else im
    canvas = Image.new(im.mode, (tw, th), (opts.pad_value,) * len(im.getbands()))
    canvas.paste(inner, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def _encode(im: "PILImage", opts: ImageOptions) -> bytes:
    buf = io.BytesIO()
    if opts.encode_format == "png":
        im.save(buf, format="PNG", compress_level=opts.png_compress_level)
    else:
        im.save(buf, format="JPEG", quality=opts.jpeg_quality)
    return buf.getvalue()


_LEVELS = np.arange(256, dtype=np.int64)


def _stats(arr: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...], int]:
    """Exact per-channel sum and sum of squares of a uint8 image, via 256-bin histograms (fast)."""
    a = arr.reshape(-1, 1 if arr.ndim == 2 else arr.shape[2])
    sums, sqs = [], []
    for c in range(a.shape[1]):
        h = np.bincount(a[:, c], minlength=256).astype(np.int64)
        sums.append(float(h @ _LEVELS))
        sqs.append(float(h @ (_LEVELS * _LEVELS)))
    return tuple(sums), tuple(sqs), int(a.shape[0])


def clean_image(data: bytes, path: str, opts: ImageOptions) -> Cleaned | Rejected:
    """Validate, normalise, resize and re-encode one file; never raises for bad input.

    Examples
    --------
    >>> from PIL import Image; import io
    >>> buf = io.BytesIO(); Image.new("RGB", (40, 30), "red").save(buf, "PNG")
    >>> r = clean_image(buf.getvalue(), "file:///x/a.png", ImageOptions(height=16, width=16))
    >>> (r.height, r.width, r.channels, r.format)
    (16, 16, 3, 'png')
    """
    from PIL import Image, ImageOps

    ext = extension(path)
    if ext not in opts.image_extensions:
        return Rejected(BAD_EXTENSION, f"extension {ext or '(none)'!r} is not in ingest.image_extensions")
    if len(data) == 0:
        return Rejected(EMPTY, "file has 0 bytes")
    # Pillow's own bomb guard is kept at our limit too (it errors at 2x, we reject at 1x below).
    Image.MAX_IMAGE_PIXELS = opts.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF warnings
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return Rejected(DECOMPRESSION_BOMB, _first_line(e))
    except Image.UnidentifiedImageError:
        return Rejected(NOT_AN_IMAGE, "no image decoder recognises the bytes")
    except Exception as e:  # noqa: BLE001 - a broken header is a corrupt file, never a crash
        return Rejected(CORRUPT, _first_line(e))
    try:
        w, h = im.size
        original = (w, h)
        if w * h > opts.max_pixels:
            return Rejected(DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > ingest.max_pixels={opts.max_pixels}")
        if min(w, h) < opts.min_side:
            return Rejected(TOO_SMALL, f"{w}x{h} has a side < ingest.min_side={opts.min_side}")
        n_frames = int(getattr(im, "n_frames", 1) or 1)
        if n_frames > 1 and opts.animated == "reject":
            return Rejected(ANIMATED, f"{n_frames} frames and ingest.animated=reject")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if im.format == "JPEG" and opts.resize_policy != "pad" and opts.jpeg_reduced_decode:
                # Decode at the smallest DCT scale that still covers the target: same result
                # quality, several times less work for large photos.
                orientation = im.getexif().get(0x0112, 1)
                im.draft(None, _target_fit(w, h, opts, swap=orientation in (5, 6, 7, 8)))
            if n_frames > 1:
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im) or im
            im = _to_mode(im, opts)
            im = _resize(im, opts)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data must become a reject row
        return Rejected(CORRUPT, _first_line(e))
    encoded = _encode(im, opts)
    if opts.encode_format == "png":
        arr = np.asarray(im)
    else:  # stats of what training will decode, not of the pre-JPEG pixels
        with Image.open(io.BytesIO(encoded)) as back:
            arr = np.asarray(back)
    raised = tuple(quality.flags(quality.measure(arr, original_size=original), opts.thresholds))
    bad = [f for f in raised if f in opts.reject_flags]
    if bad:
        return Rejected(QUALITY_FLAG, f"quality flags {', '.join(bad)} are in ingest.reject_flags")
    s, sq, n = _stats(arr)
    return Cleaned(encoded, opts.height, opts.width, opts.channels, opts.encode_format, s, sq, n,
                   phash=quality.phash(im), flags=raised)


def channel_mean_std(sums: Sequence[float], sumsqs: Sequence[float], count: int) -> Dict[str, Any]:
    """Per-channel mean/std (population) from aggregated sums; values on 0..255."""
    if count <= 0:
        return {"mean": None, "std": None}
    mean = [s / count for s in sums]
    std = [math.sqrt(max(q / count - m * m, 0.0)) for q, m in zip(sumsqs, mean)]
    return {"mean": [round(x, 6) for x in mean], "std": [round(x, 6) for x in std]}

"""A perceptual hash and quality measures of one decoded image (numpy and Pillow, Spark-free).

Ingest computes both in its single pass over the pixels (:func:`pipeline.imaging.clean.clean_image`):

* :func:`phash` - the 64-bit DCT perceptual hash (the ``imagehash.phash`` definition: grey,
  32x32 Lanczos, 2-D DCT-II, the 8x8 lowest frequencies against their median, first
  coefficient as the most significant bit), returned as a signed int64 so that Spark keeps it
  in a ``LongType`` column. Re-encoding, resizing, slight crops and brightness changes move a
  few bits; :mod:`pipeline.ingest.near_dups` finds pairs within a Hamming distance at scale.
* :func:`measure` - brightness (mean luminance), information (entropy of the 256-bin
  luminance histogram, in bits), sharpness (variance of the 4-neighbour Laplacian of the
  stored-size luminance), how much the original was enlarged to reach the stored size, and the
  original's aspect ratio. :func:`flags` turns them into named flags with
  :class:`QualityThresholds` (``ingest.quality`` in the config; defaults in ``docs/ingest.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image as PILImage

HASH_BITS = 64
_HASH_SIDE = 8
_DCT_SIDE = 32

#: Every quality flag, in the order the manifest and the report list them.
FLAGS = ("dark", "bright", "low_information", "blurry", "upscaled", "extreme_aspect")


def _dct_matrix(n: int) -> np.ndarray:
    """``C`` with ``C @ x`` = the unnormalised DCT-II of ``x`` (scipy's ``dct(x, norm=None)``)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix(_DCT_SIDE)


def phash(im: "PILImage") -> int:
    """The 64-bit DCT perceptual hash of ``im`` as a signed int64.

    Examples
    --------
    >>> from PIL import Image
    >>> phash(Image.new("L", (40, 30), 128)) == phash(Image.new("L", (80, 60), 128))
    True
    """
    from PIL import Image

    grey = np.asarray(im.convert("L").resize((_DCT_SIDE, _DCT_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:_HASH_SIDE, :_HASH_SIDE]
    value = 0
    for bit in (low > np.median(low)).ravel():
        value = (value << 1) | int(bit)
    return value - (1 << HASH_BITS) if value >= 1 << (HASH_BITS - 1) else value


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two 64-bit hashes (signed or unsigned)."""
    return bin((a ^ b) & ((1 << HASH_BITS) - 1)).count("1")


@dataclass(frozen=True)
class QualityThresholds:
    """When a measure becomes a flag (``ingest.quality``); values on 0..255 where they are pixel levels."""

    dark_below: float = 20.0
    bright_above: float = 235.0
    low_information_below: float = 2.0
    blurry_below: float = 20.0
    upscaled_above: float = 2.0
    aspect_above: float = 3.0


@dataclass(frozen=True)
class Measures:
    brightness: float
    entropy: float
    sharpness: float
    upscale: float
    aspect: float


def _luminance(arr: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an RGB array (what Pillow's ``convert("L")`` computes), or the grey array itself."""
    if arr.ndim == 2:
        return arr.astype(np.float32)
    return arr[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)


def measure(stored: np.ndarray, *, original_size: Tuple[int, int]) -> Measures:
    """Quality measures of one image: ``stored`` is the uint8 array at the stored size (HxW or HxWxC),
    ``original_size`` the decoded original's (width, height) after EXIF orientation."""
    lum = _luminance(stored)
    hist = np.bincount(np.clip(np.rint(lum), 0, 255).astype(np.int64).ravel(), minlength=256)
    p = hist[hist > 0] / lum.size
    entropy = float(-(p * np.log2(p)).sum())
    if min(lum.shape) >= 3:
        lap = lum[:-2, 1:-1] + lum[2:, 1:-1] + lum[1:-1, :-2] + lum[1:-1, 2:] - 4.0 * lum[1:-1, 1:-1]
        sharpness = float(lap.var())
    else:
        sharpness = 0.0
    w, h = original_size
    sh, sw = stored.shape[:2]
    upscale = max(sw / max(w, 1), sh / max(h, 1))
    return Measures(brightness=float(lum.mean()), entropy=entropy, sharpness=sharpness, upscale=float(upscale),
                    aspect=max(w, h) / max(min(w, h), 1))


def flags(m: Measures, t: QualityThresholds) -> List[str]:
    """The flags ``m`` raises under ``t``, in :data:`FLAGS` order."""
    raised = {
        "dark": m.brightness < t.dark_below,
        "bright": m.brightness > t.bright_above,
        "low_information": m.entropy < t.low_information_below,
        "blurry": m.sharpness < t.blurry_below,
        "upscaled": m.upscale > t.upscaled_above,
        "extreme_aspect": m.aspect > t.aspect_above,
    }
    return [f for f in FLAGS if raised[f]]

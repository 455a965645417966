"""A generated corpus of bad and odd input files, one per case, with each file's expected outcome.

:func:`write_corpus` writes the files and returns ``{relative path: Expected}``;
the ingest tests compare the job's images/ and rejects/ against it in full.
It is meant for :data:`CORPUS_OVERRIDES` (16x16 RGB PNG, a 1 MP bomb limit,
a 1 MiB file limit), which keep every file tiny.
"""
from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

CORPUS_OVERRIDES = (
    "ingest.height=16", "ingest.width=16", "ingest.color_mode=RGB", "ingest.encode_format=png",
    "ingest.max_pixels=1000000", "ingest.max_file_mb=1", "ingest.max_train_procs=1", "ingest.min_side=8",
)

LONG_NAME = "long-" + "ü" * 60 + "-name-" + "x" * 100 + ".png"  # ~230 bytes in UTF-8, under the 255 limit


@dataclass(frozen=True)
class Expected:
    """``reason`` None = accepted with ``label``; else a reject with that reason."""

    reason: Optional[str]
    label: Optional[str] = None
    #: for duplicates: the relative path of the kept copy
    kept: Optional[str] = None


def noise(seed: int, h: int = 30, w: int = 40, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def png_bytes(arr: np.ndarray, mode: Optional[str] = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def bomb_header_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels but holds no pixel data at all.

    Decoding it would fail (``corrupt``); rejecting it as ``decompression_bomb``
    proves the size is checked on the header, before any decode.
    """
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def exif_rotated_jpeg(seed: int) -> bytes:
    """A 40x20 (w x h) JPEG, left half black / right half white, EXIF orientation 6 (display rotated 90 CW)."""
    from PIL import Image

    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    arr[0, 0] = seed % 7  # distinct bytes per seed
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(img, exif=exif.tobytes())


def write_corpus(root: Path, seed: int = 0) -> Dict[str, Expected]:
    """Write every case under ``root``; returns the expected outcome of each file, by relative path."""
    from PIL import Image

    root = Path(root)
    exp: Dict[str, Expected] = {}

    def put(rel: str, data: bytes, expected: Expected) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        exp[rel] = expected

    s = seed * 1000
    # -- accepted, in several source modes ------------------------------------------
    put("cats/plain_rgb.png", png_bytes(noise(s + 1)), Expected(None, "cats"))
    put("cats/UPPER.JPG", jpeg_bytes(Image.fromarray(noise(s + 2))), Expected(None, "cats"))
    cmyk = Image.fromarray(noise(s + 3, channels=3)).convert("CMYK")
    put("cats/cmyk.jpg", jpeg_bytes(cmyk), Expected(None, "cats"))
    g16 = (noise(s + 4, channels=1).astype(np.uint16) * 257)
    put("cats/gray16.png", _png16(g16), Expected(None, "cats"))
    pal = Image.fromarray(noise(s + 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    put("cats/palette_transparent.png", buf.getvalue(), Expected(None, "cats"))
    rgba = np.dstack([noise(s + 6), noise(s + 7, channels=1)])
    put("cats/rgba.png", png_bytes(rgba, "RGBA"), Expected(None, "cats"))
    la = np.dstack([noise(s + 8, channels=1), noise(s + 9, channels=1)])
    put("cats/la.png", png_bytes(la, "LA"), Expected(None, "cats"))
    put("cats/gray.png", png_bytes(noise(s + 10, channels=1), "L"), Expected(None, "cats"))
    put("cats/exif_rotated.jpg", exif_rotated_jpeg(s + 11), Expected(None, "cats"))
    frames = [Image.fromarray(noise(s + 12 + i)).convert("P") for i in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("cats/animated.gif", buf.getvalue(), Expected(None, "cats"))
    # -- odd names ------------------------------------------------------------------
    put("dogs/ünïcödé 日本 with spaces.png", png_bytes(noise(s + 20)), Expected(None, "dogs"))
    put("dogs/-leading-dash.png", png_bytes(noise(s + 21)), Expected(None, "dogs"))
    put(f"dogs/{LONG_NAME}", png_bytes(noise(s + 22)), Expected(None, "dogs"))
    put("dogs/hash#and%20percent.png", png_bytes(noise(s + 23)), Expected(None, "dogs"))
    put("dogs/nested/deeper/inner.png", png_bytes(noise(s + 24)), Expected(None, "dogs"))
    put("dogs/ok_1.png", png_bytes(noise(s + 25)), Expected(None, "dogs"))
    put("dogs/ok_2.png", png_bytes(noise(s + 26)), Expected(None, "dogs"))
    # -- rejects --------------------------------------------------------------------
    put("cats/zero.png", b"", Expected("empty"))
    good_jpeg = jpeg_bytes(Image.fromarray(noise(s + 30, 64, 64)))
    put("cats/truncated.jpg", good_jpeg[: len(good_jpeg) // 2], Expected("corrupt"))
    put("cats/random_bytes.jpg", np.random.default_rng(s + 31).bytes(3000), Expected("not_an_image"))
    good_png = bytearray(png_bytes(noise(s + 32, 64, 64)))
    idat = good_png.find(b"IDAT")
    for i in range(idat + 40, idat + 60):
        good_png[i] ^= 0xFF
    put("cats/corrupt.png", bytes(good_png), Expected("corrupt"))
    put("cats/bomb_header.png", bomb_header_png(50_000, 50_000), Expected("decompression_bomb"))
    put("cats/bomb_real.png", png_bytes(np.zeros((1000, 1100), np.uint8), "L"), Expected("decompression_bomb"))
    put("cats/tiny.png", png_bytes(noise(s + 33, 4, 4)), Expected("too_small"))
    put("cats/notes.txt", b"not an image, just notes\n", Expected("bad_extension"))
    put("cats/no_extension", png_bytes(noise(s + 34)), Expected("bad_extension"))
    put("cats/huge.png", np.random.default_rng(s + 35).bytes(1_200_000), Expected("file_too_large"))
    put("loose_at_root.png", png_bytes(noise(s + 36)), Expected("no_label"))
    # -- duplicates: same label (one kept) and conflicting labels (all rejected) -----
    dup = png_bytes(noise(s + 40))
    put("dogs/dup_a.png", dup, Expected(None, "dogs"))
    put("dogs/dup_b.png", dup, Expected("duplicate", kept="dogs/dup_a.png"))
    conflict = png_bytes(noise(s + 41))
    put("cats/conflict.png", conflict, Expected("label_conflict"))
    put("dogs/conflict.png", conflict, Expected("label_conflict"))
    return exp


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit grayscale PNG (Pillow opens it as mode I;16)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, "PNG")
    return buf.getvalue()


def write_labelled(root: Path, labels_counts: Dict[str, int], seed: int, size: int = 24) -> Dict[str, str]:
    """Plain valid PNGs ``<root>/<label>/img_<i>.png``; returns ``{relative path: label}``."""
    out = {}
    for j, (label, n) in enumerate(sorted(labels_counts.items())):
        for i in range(n):
            rel = f"{label}/img_{seed}_{i:03d}.png"
            p = Path(root) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(png_bytes(noise(seed * 100_000 + j * 1000 + i, size, size)))
            out[rel] = label
    return out

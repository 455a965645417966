"""Per-image cleaning (pipeline.imaging.clean) and placement (pipeline.ingest.layout), without Spark: each reject reason, each normalisation, each resize policy."""
from __future__ import annotations

import dataclasses

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from corpus import bomb_header_png, exif_rotated_jpeg, jpeg_bytes, noise, png_bytes
from pipeline.imaging import clean as im
from pipeline.imaging import reasons
from pipeline.ingest import layout

OPTS = im.ImageOptions(height=16, width=16, color_mode="RGB", max_pixels=1_000_000, min_side=8)


def decode(r: im.Cleaned) -> np.ndarray:
    with Image.open(io.BytesIO(r.image)) as x:
        assert x.format == r.format.upper()
        return np.asarray(x)


def clean(data: bytes, name: str = "x.png", opts: im.ImageOptions = OPTS) -> im.Cleaned:
    r = im.clean_image(data, f"file:///in/cls/{name}", opts)
    assert isinstance(r, im.Cleaned), r
    return r


def solid(color, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def to_png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


# --- rejects ---------------------------------------------------------------------

def _truncated_jpeg() -> bytes:
    b = jpeg_bytes(Image.fromarray(noise(1, 64, 64)))
    return b[: len(b) // 2]


def _corrupt_png() -> bytes:
    b = bytearray(png_bytes(noise(2, 64, 64)))
    i = b.find(b"IDAT")
    for k in range(i + 40, i + 60):
        b[k] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("name, data, reason", [
    ("empty.png", b"", reasons.EMPTY),
    ("notes.txt", b"hello", reasons.BAD_EXTENSION),
    ("noext", png_bytes(noise(3)), reasons.BAD_EXTENSION),
    ("random.jpg", np.random.default_rng(0).bytes(2000), reasons.NOT_AN_IMAGE),
    ("truncated.jpg", _truncated_jpeg(), reasons.CORRUPT),
    ("corrupt.png", _corrupt_png(), reasons.CORRUPT),
    ("tiny.png", png_bytes(noise(4, 7, 30)), reasons.TOO_SMALL),
    ("bomb.png", png_bytes(np.zeros((1000, 1001), np.uint8), "L"), reasons.DECOMPRESSION_BOMB),
    ("bomb_header.png", bomb_header_png(50_000, 50_000), reasons.DECOMPRESSION_BOMB),
], ids=lambda v: v if isinstance(v, str) else "")
def test_each_bad_file_gets_its_reason(name, data, reason):
    r = im.clean_image(data, f"file:///in/cls/{name}", OPTS)
    assert isinstance(r, im.Rejected)
    assert r.reason == reason
    assert r.detail and "\n" not in r.detail


def test_bomb_limit_is_checked_on_the_header_before_decoding():
    # 2000x1000 claims 2 MP but carries no pixel data: decoding it would fail as corrupt.
    data = bomb_header_png(2000, 1000)
    r = im.clean_image(data, "file:///in/c/b.png", OPTS)
    assert (r.reason, r.detail) == (reasons.DECOMPRESSION_BOMB, "2000x1000 = 2000000 pixels > ingest.max_pixels=1000000")
    # With a higher limit the same file reaches the decoder, which finds it corrupt.
    r2 = im.clean_image(data, "file:///in/c/b.png", im.ImageOptions(height=16, width=16, max_pixels=10_000_000))
    assert r2.reason == reasons.CORRUPT


def test_upper_case_extension_is_accepted():
    r = clean(jpeg_bytes(solid((10, 200, 30))), "PHOTO.JPEG")
    assert (r.height, r.width, r.channels, r.format) == (16, 16, 3, "png")


# --- normalisation of source modes ---------------------------------------------------

def test_16bit_gray_is_scaled_not_clipped():
    arr = np.full((30, 40), 100 * 257, np.uint16)
    arr[:, 20:] = 65535
    r = clean(png_bytes(arr), opts=im.ImageOptions(height=30, width=40, resize_policy="stretch"))
    out = decode(r)
    assert out.shape == (30, 40, 3)
    assert set(np.unique(out[:, :20])) == {100}
    assert set(np.unique(out[:, 20:])) == {255}


def test_cmyk_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (40, 30), (0, 0, 0, 0))  # no ink = white
    out = decode(clean(jpeg_bytes(cmyk), "c.jpg"))
    assert out.shape == (16, 16, 3)
    assert out.min() >= 250


@pytest.mark.parametrize("background", [255, 0])
def test_palette_transparency_is_flattened_onto_the_configured_background(background):
    img = Image.new("P", (40, 30), 0)
    img.putpalette([10, 20, 30] * 256)
    opts = im.ImageOptions(height=16, width=16, alpha_background=background)
    out = decode(clean(to_png(img, transparency=0), opts=opts))
    assert set(np.unique(out)) == {background}


def test_rgba_half_transparent_blends_with_background():
    arr = np.zeros((30, 40, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 128
    out = decode(clean(png_bytes(arr, "RGBA")))
    a = 128 / 255
    expect = [round(200 * a + 255 * (1 - a)), round(255 * (1 - a)), round(255 * (1 - a))]
    assert out.reshape(-1, 3).min(axis=0).tolist() == expect
    assert out.reshape(-1, 3).max(axis=0).tolist() == expect


def test_la_to_grayscale_target():
    arr = np.dstack([np.full((30, 40), 60, np.uint8), np.full((30, 40), 255, np.uint8)])
    r = clean(png_bytes(arr, "LA"), opts=im.ImageOptions(height=16, width=16, color_mode="L"))
    out = decode(r)
    assert r.channels == 1 and out.shape == (16, 16)
    assert set(np.unique(out)) == {60}


def test_exif_orientation_is_applied():
    # Stored 40 wide x 20 high, left half black; orientation 6 displays it rotated 90 CW: black on top.
    r = clean(exif_rotated_jpeg(0), "r.jpg", im.ImageOptions(height=16, width=16, resize_policy="stretch"))
    out = decode(r).astype(float)
    assert out[:6].mean() < 40
    assert out[-6:].mean() > 215


def test_animated_takes_first_frame_or_rejects():
    frames = [solid((255, 0, 0)).convert("P"), solid((0, 0, 255)).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    data = buf.getvalue()
    out = decode(clean(data, "a.gif"))
    assert out.reshape(-1, 3).mean(axis=0).round().tolist() == [255.0, 0.0, 0.0]
    r = im.clean_image(data, "file:///in/c/a.gif", im.ImageOptions(height=16, width=16, animated="reject"))
    assert (r.reason, r.detail) == (reasons.ANIMATED, "2 frames and ingest.animated=reject")


# --- resize policies and encodings ---------------------------------------------------------

def _bars() -> bytes:
    """40x20: blue 5 px | red 30 px | blue 5 px (the resampling filter reaches a few px past the crop box)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :, 2] = 255
    arr[:, 5:35] = (255, 0, 0)
    return png_bytes(arr)


def test_center_crop_keeps_the_middle():
    out = decode(clean(_bars()))
    assert out.shape == (16, 16, 3)
    assert set(map(tuple, out.reshape(-1, 3))) == {(255, 0, 0)}


def test_pad_letterboxes_with_pad_value():
    out = decode(clean(_bars(), opts=im.ImageOptions(height=16, width=16, resize_policy="pad", pad_value=7)))
    assert set(np.unique(out[:4])) == {7} and set(np.unique(out[-4:])) == {7}
    assert out[4:12, 8].tolist() == [[255, 0, 0]] * 8


def test_stretch_keeps_everything():
    out = decode(clean(_bars(), opts=im.ImageOptions(height=16, width=16, resize_policy="stretch")))
    assert out[8, 0, 2] > 200 and out[8, 0, 0] < 60  # the blue border survives
    assert out[8, 8].tolist() == [255, 0, 0]


def test_large_jpeg_draft_decode_still_covers_the_target():
    big = Image.fromarray(np.kron(noise(5, 30, 40), np.ones((16, 16, 1), np.uint8)))  # 640x480
    for policy in ("center_crop", "stretch", "pad"):
        r = clean(jpeg_bytes(big), "big.jpg", im.ImageOptions(height=120, width=100, resize_policy=policy))
        assert decode(r).shape == (120, 100, 3)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_reduced_scale_jpeg_decode_keeps_the_orientation_and_the_picture(orientation):
    """A 2400x1600 original stored at 96x64: the DCT-scaled decode (1/8 here) gives what the full
    decode gives, up to resampling, with EXIF rotation applied (black half where it belongs)."""
    yy, xx = np.mgrid[0:1600, 0:2400]
    arr = np.stack([(xx // 10) % 256, (yy // 7) % 256, np.full_like(xx, 128)], -1).astype(np.uint8)
    arr[:, :1200] = 0  # the left half black (before the rotation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_bytes(Image.fromarray(arr), exif=exif.tobytes())
    h, w = (96, 64) if orientation in (6, 8) else (64, 96)
    opts = im.ImageOptions(height=h, width=w, resize_policy="stretch")
    reduced = decode(clean(data, "big.jpg", opts)).astype(np.float64)
    full = decode(clean(data, "big.jpg", dataclasses.replace(opts, jpeg_reduced_decode=False))).astype(np.float64)
    assert reduced.shape == full.shape == (h, w, 3)
    assert np.abs(reduced - full).mean() < 3.0
    black = {1: reduced[:, : w // 2 - 2], 6: reduced[: h // 2 - 2], 8: reduced[h // 2 + 2:]}[orientation]
    assert black.max() < 40, "the black half is not where the EXIF orientation puts it"


def test_jpeg_output_and_stats_describe_the_stored_bytes():
    opts = im.ImageOptions(height=16, width=16, encode_format="jpeg", jpeg_quality=80)
    r = clean(png_bytes(noise(6)), opts=opts)
    assert r.image[:2] == b"\xff\xd8" and r.format == "jpeg"
    arr = decode(r).reshape(-1, 3).astype(np.float64)
    assert r.pixel_count == 256
    np.testing.assert_allclose(r.pixel_sum, arr.sum(axis=0))
    np.testing.assert_allclose(r.pixel_sumsq, (arr * arr).sum(axis=0))


def test_cleaning_is_deterministic():
    data = jpeg_bytes(Image.fromarray(noise(7, 300, 400)))
    assert clean(data, "a.jpg").image == clean(data, "a.jpg").image


# --- identity, layout, split --------------------------------------------------------------

def test_image_id_is_sha256_of_original_bytes():
    assert im.image_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("path, ext", [("file:///a/B.JPG", ".jpg"), ("file:///a/noext", ""),
                                       ("file:///a/.hidden", ""), ("file:///a.d/x.tar.gz", ".gz")])
def test_extension(path, ext):
    assert im.extension(path) == ext


@pytest.mark.parametrize("path, root, split, label", [
    ("file:/in/cat/x.png", "file:///in", None, "cat"),
    ("file:/in/cat/sub/x.png", "file:///in", None, "cat"),
    ("file:/in/train/cat/x.png", "file:///in", "train", "cat"),
    ("file:/in/Validation/dog/x.png", "file:///in", "val", "dog"),
    ("file:/in/val/dog/x.png", "file:///in/", "val", "dog"),
    ("file:/in/test/x.png", "file:///in", "test", None),
    ("file:/in/x.png", "file:///in", None, None),
    ("file:/in/c#1/x?.png", "file:///in", None, "c#1"),
    ("hdfs://nn:8020/data/in/cat/x.png", "hdfs:///data/in", None, "cat"),
])
def test_layout(path, root, split, label):
    s, rest = layout.layout_split(layout.relative_parts(path, root))
    assert (s, layout.folder_label(rest)) == (split, label)


def test_source_paths_are_canonical_uris():
    assert layout.normalize_source("file:/a b/#1.png") == "file:///a b/#1.png"
    assert layout.normalize_source("s3a://bucket/x.png") == "s3a://bucket/x.png"


def test_hash_split_is_deterministic_and_follows_fractions():
    fr = {"train": 0.7, "val": 0.2, "test": 0.1}
    ids = [im.image_id(str(i).encode()) for i in range(20_000)]
    a = [layout.hash_split(i, fr, seed=0) for i in ids]
    assert a == [layout.hash_split(i, dict(reversed(list(fr.items()))), seed=0) for i in ids]
    c = Counter(a)
    for k, f in fr.items():
        assert abs(c[k] / len(ids) - f) < 0.015, c
    other_seed = [layout.hash_split(i, fr, seed=1) for i in ids]
    assert other_seed != a
    assert set(layout.hash_split(i, {"train": 1.0, "val": 0.0, "test": 0.0}) for i in ids[:500]) == {"train"}


def test_channel_mean_std_matches_numpy():
    x = noise(9, 10, 10).reshape(-1, 3).astype(np.float64)
    got = im.channel_mean_std(x.sum(0).tolist(), (x * x).sum(0).tolist(), x.shape[0])
    np.testing.assert_allclose(got["mean"], x.mean(0), atol=1e-5)
    np.testing.assert_allclose(got["std"], x.std(0), atol=1e-5)
    assert im.channel_mean_std([0.0], [0.0], 0) == {"mean": None, "std": None}


def test_every_reject_reason_is_documented():
    """Each reason constant appears in the docs' reason vocabulary (ingest's table, scoring's list)."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    ingest_table = {line.split("|")[1].strip().strip("`") for line in (docs / "ingest.md").read_text().splitlines()
                    if line.startswith("| `")}
    score_text = (docs / "score.md").read_text()
    values = {v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str)}
    scoring = {reasons.WRONG_SIZE, reasons.WRONG_SHAPE, reasons.UNDECODABLE}
    assert values - scoring - ingest_table == set()
    assert all(f"`{r}`" in score_text for r in scoring)

"""Perceptual hash, quality flags and near-duplicate groups (pipeline.imaging.quality, pipeline.ingest.near_dups)."""
from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.imaging.quality import (
    FLAGS, QualityThresholds, flags, hamming, measure, phash,
)
from pipeline.ingest.near_dups import blocks, hash_pairs, with_near_dup_groups


def _known_images():
    out = []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        out.append(Image.fromarray(rng.integers(0, 256, (30 + seed * 7, 40 + seed * 5, 3), dtype=np.uint8), "RGB"))
    y, x = np.mgrid[0:48, 0:64]
    out.append(Image.fromarray(((x * 3 + y * 2) % 256).astype(np.uint8), "L"))
    return out


def test_phash_equals_the_imagehash_definition_on_known_images():
    # Values printed by imagehash 4.3.2 (`str(imagehash.phash(im))`, Pillow 11.3.0) for the same images.
    expected = ["8d217abd908aafcc", "d07764490df43337", "f5ee1c4cf700eb08", "df2f868e10b76614", "952a55ab5235ea55"]
    got = [format(phash(im) & (2 ** 64 - 1), "016x") for im in _known_images()]
    assert got == expected


def test_phash_is_a_signed_int64_that_spark_can_hold():
    hs = [phash(im) for im in _known_images()]
    assert all(-(2 ** 63) <= h < 2 ** 63 for h in hs)
    assert any(h < 0 for h in hs), "hashes with the top bit set must come out negative, not overflow"


def _photo(seed: int, size=(96, 72)) -> Image.Image:
    """A smooth random 'scene' (low frequencies dominate, as in photos)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)


def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_edits_of_one_image_stay_close_and_other_images_are_far():
    im = _photo(1)
    w, h = im.size
    edits = [_jpeg(im, 40), im.resize((w // 2, h // 2)), im.crop((2, 2, w - 2, h - 2)),
             ImageEnhance.Brightness(im).enhance(1.15)]
    base = phash(im)
    assert max(hamming(base, phash(e)) for e in edits) <= 8
    others = [phash(_photo(s)) for s in range(2, 12)]
    assert min(hamming(base, o) for o in others) > 12


def _gray(value: int, size=(32, 32)) -> np.ndarray:
    return np.full(size, value, np.uint8)


def test_each_flag_is_raised_by_the_image_made_for_it_and_not_by_a_normal_one():
    t = QualityThresholds()
    rng = np.random.default_rng(0)
    normal = np.asarray(_photo(3, (64, 64)))
    normal = np.clip(normal.astype(int) + rng.integers(-40, 40, normal.shape), 0, 255).astype(np.uint8)
    assert flags(measure(normal, original_size=(64, 64)), t) == []
    dark = (normal // 8).astype(np.uint8)
    assert "dark" in flags(measure(dark, original_size=(64, 64)), t)
    bright = (255 - normal // 8).astype(np.uint8)
    assert "bright" in flags(measure(bright, original_size=(64, 64)), t)
    assert "low_information" in flags(measure(_gray(128), original_size=(32, 32)), t)
    blurred = np.asarray(Image.fromarray(normal).filter(ImageFilter.GaussianBlur(4)))
    assert "blurry" in flags(measure(blurred, original_size=(64, 64)), t)
    assert "blurry" not in flags(measure(normal, original_size=(64, 64)), t)
    assert "upscaled" in flags(measure(normal, original_size=(20, 20)), t)
    assert "extreme_aspect" in flags(measure(normal, original_size=(400, 100)), t)
    assert set(flags(measure(normal, original_size=(400, 100)), t)) <= set(FLAGS)


def test_thresholds_move_the_flags():
    m = measure(_gray(100), original_size=(32, 32))
    assert "dark" not in flags(m, QualityThresholds(dark_below=50))
    assert "dark" in flags(m, QualityThresholds(dark_below=101))


@pytest.mark.parametrize("distance", [1, 4, 6, 10])
def test_blocks_cover_all_64_bits_once(distance):
    bl = blocks(distance)
    assert len(bl) == distance + 2
    assert sorted(b for s, w in bl for b in range(s, s + w)) == list(range(64))


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _planted(n_random: int, seed: int):
    """Random hashes plus planted neighbours at known distances; ids in a deterministic order."""
    r = random.Random(seed)
    rows = []
    for i in range(n_random):
        h = r.getrandbits(64)
        rows.append((f"r{i:04d}", _signed(h)))
        if i % 10 == 0:  # a neighbour 1..6 bits away
            flip = r.sample(range(64), 1 + i % 6)
            rows.append((f"n{i:04d}", _signed(h ^ sum(1 << b for b in flip))))
        if i % 25 == 0:  # a chain: neighbour of the neighbour, 3 more bits away
            flip = r.sample(range(64), 3)
            rows.append((f"c{i:04d}", _signed(rows[-1][1] & (2 ** 64 - 1) ^ sum(1 << b for b in flip))))
    rows.append(("z_same", rows[0][1]))  # an equal hash (a perceptual duplicate with other bytes)
    return rows


def test_lsh_pairs_equal_the_brute_force_pairs(spark):
    rows = _planted(400, seed=7)
    df = spark.createDataFrame(rows, "image_id string, phash long")
    for d in (2, 4, 6):
        got = {(r.a, r.b, r.distance) for r in hash_pairs(df, distance=d).collect()}
        hs = sorted({h for _, h in rows})
        want = {(a, b, hamming(a, b)) for a, b in itertools.combinations(hs, 2) if hamming(a, b) <= d}
        assert got == want, f"distance {d}"
        assert want, "the planted neighbours must give pairs"


def test_groups_are_the_connected_components_named_by_their_smallest_id(spark):
    rows = _planted(300, seed=3)
    d = 6
    df = spark.createDataFrame(rows, "image_id string, phash long")
    got = with_near_dup_groups(df, distance=d, max_group=2).collect()
    out = {r.image_id: (r.near_dup_group, r.near_dup_size) for r in got}
    assert all(r.near_dup_oversized == (r.near_dup_size > 2) for r in got)
    assert len(out) == len(rows)
    # brute-force components over images (equal hashes are distance 0)
    parent = {i: i for i, _ in rows}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (i, a), (j, b) in itertools.combinations(rows, 2):
        if hamming(a, b) <= d:
            ri, rj = find(i), find(j)
            parent[max(ri, rj)] = min(ri, rj)
    comps = {}
    for i, _ in rows:
        comps.setdefault(find(i), []).append(i)
    for members in comps.values():
        for m in members:
            group, size = out[m]
            assert size == len(members)
            assert group == (min(members) if len(members) > 1 else None)
    assert any(len(m) >= 3 for m in comps.values()), "a chain must make a group of three"
    assert out["z_same"][0] is not None and out["z_same"][0] == out["r0000"][0], "equal hashes are one group"

"""Perceptual hash, quality flags and near-duplicate groups (pipeline.imaging.quality, pipeline.ingest.near_dups)."""
from __future__ import annotations

import io
import itertools
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from outputs import version_dir
from pipeline.imaging.quality import (
    FLAGS, QualityThresholds, flags, hamming, measure, phash,
)
from pipeline.ingest.near_dups import (
    STORED, blocks, decide, hash_pairs, local_pairs, with_near_dup_groups, with_near_duplicates,
)


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


def test_driver_pairs_equal_the_brute_force_pairs():
    rows = _planted(400, seed=11)
    hs = np.unique(np.array([h for _, h in rows], dtype=np.int64))
    for d in (0, 2, 4, 6):
        i, j = local_pairs(hs, distance=d)
        got = {(int(hs[a]), int(hs[b])) for a, b in zip(i, j)}
        want = {(int(a), int(b)) for a, b in itertools.combinations(hs.tolist(), 2) if hamming(a, b) <= d}
        assert got == want, f"distance {d}"
        assert len(got) == len(i), "every pair comes out once"
        assert d == 0 or want


@pytest.mark.parametrize("driver_max", [0, 10_000], ids=["spark-join", "driver"])
def test_groups_are_the_connected_components_named_by_their_smallest_id(spark, driver_max):
    rows = _planted(300, seed=3)
    d = 6
    df = spark.createDataFrame(rows, "image_id string, phash long")
    got = with_near_dup_groups(df, distance=d, max_group=2, driver_max=driver_max).collect()
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


def _member(i, split, source, group="g", size=4, oversized=False):
    return {"image_id": i, "split": split, "split_source": source, "source_path": f"/in/{i}.png",
            "near_dup_group": group, "near_dup_size": size, "near_dup_oversized": oversized}


def test_the_anchor_is_the_smallest_given_id_and_hash_splits_follow_it():
    members = [_member("a", "train", "hash"), _member("b", "val", "carved"), _member("c", "test", "folder"),
               _member("d", "train", "hash"), _member("e", "train", "folder")]
    got = {r["image_id"]: r for r in decide(members, policy="same_split", distance=4)}
    # anchor: c (the smallest id whose split was given), not a (smallest overall)
    assert got["a"]["_split"] == "test" and got["d"]["_split"] == "test"
    assert got["b"]["_split"] == "val", "carved out of train/ moves only to train or val"
    assert got["e"]["_split"] == "train", "a given split never moves"
    assert all(r["_reason"] is None for r in got.values())
    kept = decide(members, policy="keep_one", distance=4)
    assert [r["image_id"] for r in kept if r["_reason"] is None] == ["c"]
    assert all(r["_detail"].endswith("of /in/c.png") for r in kept if r["_reason"] is not None)
    # a carved member follows an anchor in train
    carved = decide([_member("x", "val", "carved"), _member("y", "train", "folder")], policy="same_split", distance=4)
    assert [r["_split"] for r in carved] == ["train", "train"]


def test_oversized_groups_and_stored_rows_are_never_acted_on():
    over = [_member("a", "test", "folder", oversized=True), _member("b", "train", "hash", oversized=True)]
    assert [r["_split"] for r in decide(over, policy="same_split", distance=4)] == ["test", "train"]
    assert all(r["_reason"] is None for r in decide(over, policy="keep_one", distance=4))
    stored = [_member("z", "test", STORED), _member("b", "train", "hash"), _member("a", "val", STORED)]
    got = decide(stored, policy="keep_one", distance=4)
    # the stored 'a' is the anchor: the new 'b' is rejected, the stored 'z' is kept
    assert [(r["image_id"], r["_reason"]) for r in got] == [("z", None), ("b", "near_duplicate"), ("a", None)]
    assert decide(stored, policy="same_split", distance=4)[1]["_split"] == "val"
    assert all(r["_split"] == r["_split_before"] for r in decide(stored, policy="report", distance=4))


@pytest.mark.parametrize("policy", ["same_split", "keep_one", "report"])
def test_the_driver_and_the_executors_decide_the_same(spark, policy):
    """The policy found from one collected row per image equals the one found by the Spark join."""
    from pyspark.sql import functions as F

    r = random.Random(5)
    sources = ["folder", "hash", "carved"]
    rows = [(i, h, r.choice(["train", "val", "test"]), r.choice(sources), f"/in/{i}.png",
             "duplicate" if n % 37 == 0 else None) for n, (i, h) in enumerate(_planted(400, seed=7))]
    df = spark.createDataFrame(rows, "image_id string, phash long, split string, split_source string, "
                                     "source_path string, reason string").withColumn("detail", F.lit(None).cast("string"))
    stored = spark.createDataFrame([(f"s{i:03d}", h ^ 1, "test", f"/old/{i}.png") for i, (_, h) in
                                    enumerate(_planted(60, seed=7)[:40])],
                                   "image_id string, phash long, split string, source_path string")
    kw = dict(policy=policy, distance=4, max_group=3, stored=stored)
    on_driver = with_near_duplicates(df, rows_at_most=len(rows) + 40, **kw)
    on_spark = with_near_duplicates(df, rows_at_most=None, **kw)
    assert on_driver.summary == on_spark.summary
    assert on_driver.pairs == on_spark.pairs
    assert sorted(on_driver.frame.collect()) == sorted(on_spark.frame.collect())
    assert on_driver.summary["groups"] >= 10 and on_driver.summary["oversized_groups"] >= 1
    assert on_driver.summary["cross_split_groups"], "random splits must give cross-split groups"
    if policy == "keep_one":
        assert on_driver.summary["rejected"] > 0
    if policy == "same_split":
        assert on_driver.summary["moved"] > 0


# --- ingest: near-duplicate policies, flags, manifest, examples (real Fashion-MNIST images) ----------

QUALITY_OVERRIDES = ("ingest.height=28", "ingest.width=28", "ingest.color_mode=L", "ingest.max_train_procs=1",
                     "ingest.near_dup_distance=4")


def _distinct_originals(n: int, min_distance: int = 14):
    """``n`` real Fashion-MNIST training images (with labels) whose pHashes are pairwise far apart."""
    from pipeline.sample_data import CLASSES, load_split, locate_fashion_mnist

    images, labels = load_split(locate_fashion_mnist(), "train")
    chosen, hashes = [], []
    for img, lab in zip(images, labels):
        im = Image.fromarray(img)
        h = phash(im)
        if img.mean() > 60 and all(hamming(h, o) >= min_distance for o in hashes):
            chosen.append((im, CLASSES[lab]))
            hashes.append(h)
            if len(chosen) == n:
                return chosen
    raise AssertionError("not enough distinct images")


def _variants(im: Image.Image):
    """Three edits of ``im`` that a person calls the same picture: re-encoded, resized, brightened."""
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70)
    return {"jpg": buf.getvalue(), "resized.png": im.resize((34, 34), Image.Resampling.LANCZOS),
            "bright.png": ImageEnhance.Brightness(im).enhance(1.15)}


def _save(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    else:
        obj.save(path)


@pytest.fixture(scope="module")
def quality_inputs(tmp_path_factory):
    """Two inputs of real images with planted near-duplicates: ``flat`` (splits from the content hash)
    and ``given`` (train/ and test/ folders, 5 test images are edits of train images)."""
    originals = _distinct_originals(36)
    root = tmp_path_factory.mktemp("quality_inputs")
    flat, given = root / "flat", root / "given"
    for i, (im, label) in enumerate(originals[:30]):
        _save(flat / label / f"orig_{i:02d}.png", im)
        if i < 10:
            for suffix, v in _variants(im).items():
                _save(flat / label / f"dup_{i:02d}.{suffix}", v)
    dark = Image.fromarray((np.asarray(originals[30][0], np.float32) * 0.05).astype(np.uint8))
    _save(flat / originals[30][1] / "planted_dark.png", dark)
    _save(flat / originals[31][1] / "planted_upscaled.png", originals[31][0].resize((11, 11), Image.Resampling.LANCZOS))
    wide = np.concatenate([np.asarray(originals[32][0])] * 4, axis=1)  # 28 x 112
    _save(flat / originals[32][1] / "planted_wide.png", Image.fromarray(wide))
    flatgrey = np.full((28, 28), 128, np.uint8)
    flatgrey[::7, ::7] = 140
    _save(flat / originals[33][1] / "planted_flat.png", Image.fromarray(flatgrey))
    for i, (im, label) in enumerate(originals[:20]):
        _save(given / "train" / label / f"orig_{i:02d}.png", im)
        if i < 5:
            _save(given / "test" / label / f"edited_{i:02d}.png", _variants(im)["bright.png"])
    for i, (im, label) in enumerate(originals[20:30]):
        _save(given / "test" / label / f"other_{i:02d}.png", im)
    return {"flat": flat, "given": given}


def _ingest(spark, src, tmp_path, *sets):
    import json

    from pipeline import ingest
    from pipeline.config import load_config

    cfg = load_config(["local.yaml"], ["spark.ui_enabled=false", "spark.log_level=ERROR", *QUALITY_OVERRIDES, *sets])
    out = tmp_path / "out"
    ingest.run(spark, cfg, input_uri=str(src), output_uri=str(out), mode="overwrite")
    out = version_dir(out)
    manifest = json.loads((out / "_manifest.json").read_text())
    images = spark.read.parquet(str(out / "images")).select(
        "source_path", "split", "phash", "quality_flags", "near_dup_group").toPandas()
    rejects = spark.read.parquet(str(out / "rejects")).toPandas()
    assert manifest["files_seen"] == manifest["accepted"] + sum(manifest["rejected"].values())
    assert len(images) == manifest["accepted"] and len(rejects) == sum(manifest["rejected"].values())
    return manifest, images, rejects, json.loads((out / "_quality_examples.json").read_text())


def _name(p):
    return p.rsplit("/", 1)[-1]


@pytest.mark.slow
def test_same_split_puts_every_near_duplicate_group_in_one_split(spark, quality_inputs, tmp_path):
    manifest, images, rejects, examples = _ingest(spark, quality_inputs["flat"], tmp_path)
    near = manifest["quality"]["near_duplicates"]
    images["name"] = images["source_path"].map(_name)
    in_groups = images[images["near_dup_group"].notna()]
    # the 10 planted groups (an original and its 3 edits), and nothing else among far-apart originals
    assert near["groups"] == 10 and near["images_in_groups"] == 40 and len(in_groups) == 40
    for _, g in in_groups.groupby("near_dup_group"):
        assert sorted(n.split("_")[1][:2] for n in g["name"]) == [g["name"].iloc[0].split("_")[1][:2]] * 4
        assert g["split"].nunique() == 1, g
    assert near["cross_split_groups"] == {} and near["leaked_images"] == {}
    assert near["moved"] > 0  # with 10 groups of 4 hash-placed images, some landed apart before
    assert manifest["splits"] == images["split"].value_counts().to_dict()
    assert rejects.empty
    # quality flags of the planted images
    flagged = {n: set(f) for n, f in zip(images["name"], images["quality_flags"])}
    assert "dark" in flagged["planted_dark.png"]
    assert "upscaled" in flagged["planted_upscaled.png"]
    assert "extreme_aspect" in flagged["planted_wide.png"]
    assert "low_information" in flagged["planted_flat.png"]
    assert not flagged["orig_00.png"] & {"dark", "upscaled", "extreme_aspect", "low_information"}
    counts = manifest["quality"]["flags"]
    for flag in ("dark", "upscaled", "extreme_aspect", "low_information"):
        assert sum(per[flag] for per in counts.values()) == sum(flag in f for f in flagged.values())
        assert examples["flags"][flag], flag
    assert 1 <= len(examples["near_duplicate_pairs"]) <= 6
    a, b = examples["near_duplicate_pairs"][0]
    assert a["png"] and b["png"] and a["source_path"] != b["source_path"]


@pytest.mark.slow
def test_given_splits_win_and_their_near_duplicates_are_reported_as_leaks(spark, quality_inputs, tmp_path):
    manifest, images, rejects, _ = _ingest(spark, quality_inputs["given"], tmp_path,
                                           "ingest.carve_val_from_train=false")
    near = manifest["quality"]["near_duplicates"]
    assert near["cross_split_groups"] == {"test+train": 5}
    assert near["leaked_images"] == {"test": 5, "train": 5}
    assert near["moved"] == 0 and manifest["splits"] == {"test": 15, "train": 20}
    edited = images[images["source_path"].str.contains("edited_")]
    assert (edited["split"] == "test").all() and edited["near_dup_group"].notna().all()


@pytest.mark.slow
def test_keep_one_rejects_the_others_and_reject_flags_reject(spark, quality_inputs, tmp_path):
    manifest, images, rejects, _ = _ingest(spark, quality_inputs["given"], tmp_path,
                                           "ingest.carve_val_from_train=false", "ingest.near_duplicates=keep_one")
    near = manifest["quality"]["near_duplicates"]
    assert manifest["rejected"] == {"near_duplicate": 5} and near["rejected"] == 5
    assert near["cross_split_groups"] == {} and near["leaked_images"] == {}
    assert rejects["detail"].str.contains("near-duplicate").all()
    kept = images.groupby("near_dup_group").size()
    assert (kept == 1).all() and len(kept) == 5

    manifest, images, rejects, _ = _ingest(spark, quality_inputs["flat"], tmp_path, "ingest.near_duplicates=report",
                                           "ingest.reject_flags=[low_information]")
    names = set(rejects["source_path"].map(_name))
    # the near-constant image, and the darkened one (0.05 x its levels leaves few grey values)
    assert "planted_flat.png" in names and names <= {"planted_flat.png", "planted_dark.png"}
    assert manifest["rejected"] == {"quality_flag": len(names)}
    assert rejects["detail"].str.contains("low_information").all()
    assert manifest["quality"]["near_duplicates"]["policy"] == "report"
    assert manifest["quality"]["near_duplicates"]["groups"] == 10


@pytest.mark.slow
def test_the_quality_section_renders_in_a_real_browser_and_every_image_loads(spark, quality_inputs, tmp_path):
    from browser import rendered

    from pipeline.quality_report import IMAGES_CHECK, read_examples, section

    manifest, *_ = _ingest(spark, quality_inputs["given"], tmp_path, "ingest.carve_val_from_train=false")
    page = tmp_path / "page" / "index.html"
    page.parent.mkdir()
    body = section(manifest, read_examples(str(tmp_path / "out")), page.parent)
    page.write_text(f"<!doctype html><html><body>{body}{IMAGES_CHECK}</body></html>")
    shown = rendered(page)
    assert shown["total"] >= 2 * 5 and shown["loaded"] == shown["total"]  # 5 cross-split pairs at least
    assert "5 groups across test+train" in shown["dom"]
    (page.parent / "quality" / "pair_0_0.png").unlink()  # a broken image is seen as broken
    assert rendered(page)["loaded"] == shown["total"] - 1

"""The dataset layer: sharding, exact steps, exactly-once evaluation, reproducible shuffles, clear errors.

Most tests read Parquet written here by :func:`write_ingest_layout`, a test helper
that writes the ingest layout of docs/contracts.md with pyarrow and *explicitly
uneven* row groups (what uneven sharding must survive). The last tests read the
real ingest output (``ingested_sample``).
"""
from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import DataError

H, W, C = 8, 8, 3
MEAN = [100.0, 110.0, 120.0]
STD = [50.0, 60.0, 70.0]
#: Row groups per file, per split: uneven on purpose (sizes 1..11, files with 1-3 groups).
TRAIN_GROUPS = [[5, 7], [3], [9, 2, 4], [11]]  # 41 rows, 7 row groups
VAL_GROUPS = [[4, 1], [6]]                     # 11 rows, 3 row groups


# --- test helper: the ingest layout, written directly ---------------------------------

def pixels(k: int) -> np.ndarray:
    """The (H, W, C) uint8 image of row ``k``: asymmetric, so a flip or a shift is visible."""
    y, x, c = np.mgrid[0:H, 0:W, 0:C]
    return ((k * 7 + x * 13 + y * 3 + c * 50) % 256).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, "RGB" if arr.shape[-1] == 3 else "L").save(buf, "PNG")
    return buf.getvalue()


def _schema():
    import pyarrow as pa

    from pipeline.schema import IMAGE_FIELDS, SPLIT_COLUMN

    types = {"string": pa.string(), "int": pa.int32(), "binary": pa.binary()}
    return pa.schema([pa.field(f.name, types[f.spark_type], f.nullable) for f in IMAGE_FIELDS
                      if f.name != SPLIT_COLUMN])


def write_ingest_layout(root: Path, splits: Dict[str, List[List[int]]], *, manifest_extra: dict | None = None,
                        image_fn=None, label_fn=None) -> str:
    """Write ``images/split=<s>/part-NNNNN.parquet`` (one ``write_table`` per row group), manifest and marker.

    Row ids run over all splits in order; returns the output URI.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_fn = image_fn or (lambda k: png_bytes(pixels(k)))
    label_fn = label_fn or (lambda k: k % 3)
    schema = _schema()
    k = 0
    counts, groups = {}, {}
    for split, files in splits.items():
        d = root / "images" / f"split={split}"
        d.mkdir(parents=True)
        counts[split] = sum(map(sum, files))
        groups[split] = sum(map(len, files))
        for fi, sizes in enumerate(files):
            with pq.ParquetWriter(str(d / f"part-{fi:05d}.parquet"), schema) as w:
                for n in sizes:
                    ids = range(k, k + n)
                    k += n
                    labels = [label_fn(i) for i in ids]
                    w.write_table(pa.table({
                        "image_id": [f"img{i:04d}" for i in ids],
                        "source_path": [f"file:///raw/{i}.png" for i in ids],
                        "label": [None if lab is None else f"c{lab}" for lab in labels],
                        "label_index": pa.array(labels, pa.int32()),
                        "height": pa.array([H] * n, pa.int32()),
                        "width": pa.array([W] * n, pa.int32()),
                        "channels": pa.array([C] * n, pa.int32()),
                        "format": ["png"] * n,
                        "image": pa.array([image_fn(i) for i in ids], pa.binary()),
                    }, schema=schema))
    manifest = {
        "version": 1, "splits": counts, "row_groups": groups,
        "classes": {"c0": 0, "c1": 1, "c2": 2},
        "image": {"height": H, "width": W, "channels": C, "color_mode": "RGB", "format": "png"},
        "stats": {"mean": MEAN, "std": STD},
        **(manifest_extra or {}),
    }
    (root / "_manifest.json").write_text(json.dumps(manifest))
    (root / "_PIXELMILL_COMMITTED").write_text("{}")
    return "file://" + str(root)


def split_ids(splits: Dict[str, List[List[int]]], split: str) -> List[str]:
    k = 0
    for s, files in splits.items():
        n = sum(map(sum, files))
        if s == split:
            return [f"img{i:04d}" for i in range(k, k + n)]
        k += n
    raise KeyError(split)


SPLITS = {"train": TRAIN_GROUPS, "val": VAL_GROUPS}


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory) -> str:
    return write_ingest_layout(tmp_path_factory.mktemp("layout") / "out", SPLITS)


def config(*overrides: str):
    # Streaming every pass unless a test turns the decoded cache on.
    return load_config(overrides=["loader.workers_count=2", "loader.shuffle_buffer=16", "loader.cache_max_mb=0",
                                  *overrides])


@pytest.fixture(scope="module")
def cfg():
    return config()


def ids_of(batches: Sequence) -> List[str]:
    return [b.decode() for batch in batches for b in batch[2].numpy().tolist()]


def take(ds, n: int) -> list:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def expected_norm(k: int) -> np.ndarray:
    return (pixels(k).astype(np.float32) - np.float32(MEAN)) / np.float32(STD)


# --- manifest and layout ----------------------------------------------------------------

def test_read_manifest_returns_the_committed_manifest(data_uri):
    from pipeline.contracts import read_manifest

    m = read_manifest(data_uri)
    assert m["splits"] == {"train": 41, "val": 11}
    assert m["row_groups"] == {"train": 7, "val": 3}


def test_read_manifest_refuses_uncommitted_or_missing_output(tmp_path):
    from pipeline.contracts import read_manifest

    with pytest.raises(DataError, match="does not exist: run ingest first"):
        read_manifest("file://" + str(tmp_path / "nope"))
    uri = write_ingest_layout(tmp_path / "crashed", {"train": [[2]]})
    (tmp_path / "crashed" / "_PIXELMILL_COMMITTED").unlink()
    with pytest.raises(DataError, match="not a committed ingest output.*re-run ingest"):
        read_manifest(uri)


def test_split_layout_lists_row_groups_in_petastorm_order(data_uri):
    from pipeline.dataset import split_layout

    layout = split_layout(data_uri, "train")
    assert layout.row_group_rows == (5, 7, 3, 9, 2, 4, 11)
    assert layout.num_rows == 41
    assert layout.null_labels == 0
    # row group i -> shard i % 3: {5, 9, 11} {7, 2} {3, 4}
    assert [layout.shard_rows(r, 3) for r in range(3)] == [25, 9, 7]


# --- training mode ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3])
def test_train_steps_identical_on_all_ranks_and_stream_never_ends(data_uri, cfg, size):
    from pipeline.dataset import train_dataset

    batch = 4
    steps = []
    for rank in range(size):
        with train_dataset(data_uri, cfg, rank=rank, size=size, batch_size=batch, seed=7) as data:
            steps.append(data.steps_per_epoch)
            # Three epochs: far more than the smallest shard (2 rows at size 3) holds.
            got = take(data.dataset, 3 * data.steps_per_epoch)
            assert all(x.shape == (batch, H, W, C) and x.dtype.name == "float32" for x, _ in got)
            assert all(y.shape == (batch,) and y.dtype.name == "int32" for _, y in got)
    assert steps == [max(1, 41 // (size * batch))] * size


def test_train_ranks_read_disjoint_shards_whose_union_is_the_split(data_uri):
    from pipeline.dataset import split_layout, train_dataset

    cfg = config("loader.shuffle_buffer=0")
    layout = split_layout(data_uri, "train")
    seen = []
    for rank in range(3):
        with train_dataset(data_uri, cfg, rank=rank, size=3, batch_size=1, seed=3, with_ids=True) as data:
            assert data.num_rows == layout.shard_rows(rank, 3)
            one_pass = ids_of(take(data.dataset, data.num_rows))
            assert len(set(one_pass)) == data.num_rows  # a full pass before any row repeats
            seen.append(set(one_pass))
    assert sum(map(len, seen)) == 41
    assert set().union(*seen) == set(split_ids(SPLITS, "train"))


def test_train_order_is_reproducible_and_reshuffled_every_pass(data_uri):
    from pipeline.dataset import train_dataset

    # One reader thread: with more, petastorm's round robin order depends on thread timing (see docs/dataset.md).
    cfg = config("loader.shuffle_buffer=0", "loader.workers_count=1")

    def sequence(seed: int) -> List[str]:
        with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=1, seed=seed, with_ids=True) as data:
            return ids_of(take(data.dataset, 41 * 3))

    a, b, other = sequence(11), sequence(11), sequence(12)
    assert a == b                                  # same seed: same order
    assert a != other                              # another seed: another order
    passes = [a[0:41], a[41:82], a[82:123]]
    assert all(sorted(p) == split_ids(SPLITS, "train") for p in passes)  # each pass is the whole split...
    assert passes[0] != passes[1] and passes[1] != passes[2]             # ...in a new order
    # Row groups arrive whole, but their rows are shuffled too: the 11-row group is contiguous, not in file order.
    last_group = split_ids(SPLITS, "train")[30:41]
    for p in passes:
        start = p.index(min(last_group, key=p.index))
        assert sorted(p[start:start + 11]) == last_group and p[start:start + 11] != last_group


def test_train_shuffle_buffer_mixes_rows_across_passes_reproducibly(data_uri):
    from pipeline.dataset import train_dataset

    def first_rows(buffer: int) -> List[str]:
        with train_dataset(data_uri, config(f"loader.shuffle_buffer={buffer}", "loader.workers_count=1"), rank=0, size=1, batch_size=41,
                           seed=5, with_ids=True) as data:
            return ids_of(take(data.dataset, 1))

    unbuffered, buffered, again = first_rows(0), first_rows(64), first_rows(64)
    assert buffered == again
    assert sorted(unbuffered) == split_ids(SPLITS, "train")  # no buffer: the first 41 rows are one pass
    assert len(set(buffered)) < 41  # a 64-row buffer already mixes rows of the second pass in


@pytest.mark.parametrize("cache_mb, batch_index", [(0, 0), (1, 0), (1, 2)])  # streaming; cached 1st / 3rd pass
def test_train_images_are_normalised_with_manifest_stats_and_flipped_or_not(data_uri, cache_mb, batch_index):
    from pipeline.dataset import train_dataset

    cfg = config("loader.augment.flip_left_right=true", "loader.augment.crop_pad=0", f"loader.cache_max_mb={cache_mb}")
    with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=41, seed=1, with_ids=True) as data:
        x, y, ids = take(data.dataset, batch_index + 1)[batch_index]
    flipped = 0
    for img, lab, i in zip(x.numpy(), y.numpy(), ids.numpy()):
        k = int(i.decode()[3:])
        want = expected_norm(k)
        assert lab == k % 3
        if np.allclose(img, want, atol=1e-5):
            continue
        np.testing.assert_allclose(img, want[:, ::-1], atol=1e-5)
        flipped += 1
    assert 5 < flipped < 36  # about half of 41


@pytest.mark.parametrize("cache_mb, batch_index", [(0, 0), (1, 0), (1, 2)])  # streaming; cached 1st / 3rd pass
def test_train_pad_and_crop_shifts_each_image_within_the_pad(data_uri, cache_mb, batch_index):
    from pipeline.dataset import train_dataset

    pad = 2
    cfg = config("loader.augment.flip_left_right=false", f"loader.augment.crop_pad={pad}", f"loader.cache_max_mb={cache_mb}")
    with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=41, seed=1, with_ids=True) as data:
        x, _, ids = take(data.dataset, batch_index + 1)[batch_index]
    shifts = set()
    for img, i in zip(x.numpy(), ids.numpy()):
        padded = np.pad(expected_norm(int(i.decode()[3:])), [(pad, pad), (pad, pad), (0, 0)])
        match = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if np.allclose(img, padded[dy:dy + H, dx:dx + W], atol=1e-5)]
        assert match, "output is not a crop of the zero-padded image"
        shifts.add(match[0])
    assert len(shifts) > 3


# --- training mode with the decoded cache ----------------------------------------------------

@pytest.mark.parametrize("size", [1, 2])
def test_train_cache_reads_parquet_once_and_reshuffles_every_pass_reproducibly(data_uri, size):
    from pipeline.dataset import split_layout, train_dataset

    cfg = config("loader.cache_max_mb=1", "loader.shuffle_buffer=0", "loader.workers_count=1")
    layout = split_layout(data_uri, "train")

    def sequence(rank: int, seed: int):
        with train_dataset(data_uri, cfg, rank=rank, size=size, batch_size=1, seed=seed, with_ids=True) as data:
            n = data.num_rows
            ids = ids_of(take(data.dataset, 4 * n))
            return [ids[i * n:(i + 1) * n] for i in range(4)], data._source.passes_started

    union = set()
    for rank in range(size):
        passes, readers = sequence(rank, 11)
        assert readers == 1  # four passes, one Parquet read
        shard = sorted(passes[0])
        assert len(shard) == layout.shard_rows(rank, size) == len(set(shard))
        assert all(sorted(p) == shard for p in passes)  # every pass is the whole shard...
        assert len({tuple(p) for p in passes}) == 4     # ...in a new order
        again, _ = sequence(rank, 11)
        other, _ = sequence(rank, 12)
        assert again == passes and other != passes      # reproducible from the seed
        union |= set(shard)
    assert union == set(split_ids(SPLITS, "train"))


def test_train_cache_gives_the_streamed_pixels_and_labels(data_uri):
    from pipeline.dataset import train_dataset

    cfg = config("loader.cache_max_mb=1", "loader.augment.flip_left_right=false")
    with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=41, seed=2, with_ids=True) as data:
        batches = take(data.dataset, 3)  # the first pass (filling the cache) and two from memory
    for x, y, ids in batches:
        assert x.dtype.name == "float32" and y.dtype.name == "int32"
        for img, lab, i in zip(x.numpy(), y.numpy(), ids.numpy()):
            k = int(i.decode()[3:])
            assert lab == k % 3
            np.testing.assert_allclose(img, expected_norm(k), atol=1e-5)


def test_train_streams_every_pass_when_the_cache_is_off_or_too_small(data_uri):
    from pipeline.dataset import decoded_cache_mb, train_dataset
    from pipeline.imaging.stored import ImageSpec

    with train_dataset(data_uri, config("loader.cache_max_mb=0"), rank=0, size=1, batch_size=41, seed=2) as data:
        take(data.dataset, 3)
        assert data._source.passes_started >= 3
    # Fashion-MNIST's train split on one of two ranks: 27,000 x 28 x 28 x 1 bytes, about 20 MiB.
    assert decoded_cache_mb(27_000, ImageSpec(28, 28, 1, "png")) == pytest.approx(20.4, abs=0.1)
    # 50,000 224x224 RGB photos per rank do not fit the default 512 MiB: they stream.
    assert decoded_cache_mb(50_000, ImageSpec(224, 224, 3, "jpeg")) > 512


# --- uint8 batches and the random resized crop -----------------------------------------------

@pytest.mark.parametrize("cache_mb", [0, 1])
def test_uint8_batches_hold_the_stored_pixels_and_model_input_normalises_them(data_uri, cache_mb):
    from pipeline.dataset import eval_dataset, train_dataset

    cfg = config("loader.augment.flip_left_right=false", f"loader.cache_max_mb={cache_mb}")
    with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=41, seed=3, with_ids=True, pixels="uint8") as data:
        batches = take(data.dataset, 2)
        prepared = [data.model_input(x).numpy() for x, _, _ in batches]
    with eval_dataset(data_uri, cfg, split="val", rank=0, size=1, batch_size=4, with_ids=True,
                      pixels="uint8") as val:
        batches += list(val.dataset)
        prepared += [val.model_input(x).numpy() for x, _, _ in list(val.dataset)]
    assert len(batches) == 2 + 3
    for (x, _, ids), xin in zip(batches, prepared):
        assert x.dtype.name == "uint8" and xin.dtype.name == "float32"
        for img, norm, i in zip(x.numpy(), xin, ids.numpy()):
            k = int(i.decode()[3:])
            np.testing.assert_array_equal(img, pixels(k))
            np.testing.assert_allclose(norm, expected_norm(k), atol=1e-5)


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_uint8_pad_and_crop_pads_with_the_rounded_channel_mean(data_uri, cache_mb):
    from pipeline.dataset import train_dataset

    pad = 2
    cfg = config("loader.augment.flip_left_right=false", f"loader.augment.crop_pad={pad}", f"loader.cache_max_mb={cache_mb}")
    with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=41, seed=1, with_ids=True, pixels="uint8") as data:
        x, _, ids = take(data.dataset, 2)[1]
    shifts = set()
    for img, i in zip(x.numpy(), ids.numpy()):
        padded = np.pad(pixels(int(i.decode()[3:])), [(pad, pad), (pad, pad), (0, 0)])
        padded[:pad], padded[-pad:], padded[:, :pad], padded[:, -pad:] = MEAN, MEAN, MEAN, MEAN
        match = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if np.array_equal(img, padded[dy:dy + H, dx:dx + W])]
        assert match, "output is not a crop of the mean-padded image"
        shifts.add(match[0])
    assert len(shifts) > 3


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_random_resized_crop_of_the_whole_image_is_the_image(data_uri, cache_mb):
    """scale [1, 1] and ratio [1, 1] on square images: the window is the image, the resize a no-op."""
    from pipeline.dataset import train_dataset

    cfg = config("loader.augment.flip_left_right=false", "loader.augment.random_resized_crop=true",
                 "loader.augment.crop_scale=[1.0,1.0]", "loader.augment.crop_ratio=[1.0,1.0]",
                 f"loader.cache_max_mb={cache_mb}")
    for dtype in ("uint8", "float32"):
        with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=41, seed=1, with_ids=True, pixels=dtype) as data:
            x, _, ids = take(data.dataset, 2)[1]
        for img, i in zip(x.numpy(), ids.numpy()):
            k = int(i.decode()[3:])
            np.testing.assert_allclose(img, pixels(k) if dtype == "uint8" else expected_norm(k), atol=1e-4)


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_random_resized_crop_is_reproducible_per_seed_and_new_every_pass(data_uri, cache_mb):
    from pipeline.dataset import train_dataset

    cfg = config("loader.augment.flip_left_right=true", "loader.augment.random_resized_crop=true",
                 "loader.shuffle_buffer=0", "loader.workers_count=1", f"loader.cache_max_mb={cache_mb}")

    def passes(seed: int):
        with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=41, seed=seed, with_ids=True,
                           pixels="uint8") as data:
            return [{i.decode(): img for img, i in zip(x.numpy(), ids.numpy())} for x, _, ids in take(data.dataset, 3)]

    first, again, other = passes(5), passes(5), passes(6)
    for a, b in zip(first, again):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    same = lambda a, b: sum(np.array_equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(first[0], other[0]) < 5   # another seed, other crops
    assert same(first[0], first[1]) < 5   # the next pass, other crops of the same images
    assert all(img.dtype == np.uint8 and img.shape == (H, W, C) for p in first for img in p.values())


def test_crop_windows_stay_inside_the_image_with_the_configured_area_and_aspect():
    import tensorflow as tf

    from pipeline.config import AugmentConfig
    from pipeline.dataset.tfdata import crop_window

    aug = AugmentConfig(random_resized_crop=True, crop_scale=(0.25, 0.8), crop_ratio=(0.75, 4 / 3))
    hw = (224, 160)
    areas, inside, fallbacks = [], True, 0
    for i in range(300):
        begin, size = (t.numpy() for t in crop_window(tf.constant(hw), tf.constant([9, i], tf.int64), aug))
        inside &= bool((begin >= 0).all() and (begin + size <= hw).all() and (size > 0).all())
        if tuple(size) == hw:
            fallbacks += 1
            continue
        area = size[0] * size[1] / (hw[0] * hw[1])
        ratio = size[1] / size[0]
        assert 0.25 - 0.02 <= area <= 0.8 + 0.02, (begin, size)
        assert 0.75 - 0.05 <= ratio <= 4 / 3 + 0.05, (begin, size)
        areas.append(area)
    assert inside
    assert fallbacks < 30 and max(areas) - min(areas) > 0.4  # spread over the range, rarely the whole image


@pytest.mark.parametrize("subsampling", [0, 2])  # Pillow's 4:4:4 and its default 4:2:0
def test_jpeg_decodes_to_pillow_pixels_and_a_window_to_the_slice_of_the_image(subsampling):
    """Training decodes JPEGs as scoring's Pillow fallback does (accurate IDCT), and the
    crop-only decode gives the pixels of the full decode's window (with 4:2:0 chroma, all but
    the window's first and last columns: the chroma upsampling there lacks its neighbour)."""
    import tensorflow as tf
    from PIL import Image

    from pipeline.imaging.stored import ImageSpec, tf_decode_u8, tf_decode_window_u8

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    photo = np.stack([(xx * 4 + yy) % 256, (yy * 5) % 256, (xx * yy) % 256], -1) + rng.integers(0, 30, (48, 64, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90, subsampling=subsampling)
    data = buf.getvalue()
    spec = ImageSpec(48, 64, 3, "jpeg")
    full = tf_decode_u8(tf.constant(data), spec).numpy()
    np.testing.assert_array_equal(full, np.asarray(Image.open(io.BytesIO(data))))
    for (y, x, h, w) in [(0, 0, 48, 64), (5, 7, 20, 30), (16, 16, 16, 16), (40, 50, 8, 14)]:
        win = tf_decode_window_u8(tf.constant(data), spec, tf.constant([y, x]), tf.constant([h, w])).numpy()
        assert win.shape == (h, w, 3)
        want = full[y:y + h, x:x + w]
        if subsampling == 0:
            np.testing.assert_array_equal(win, want)
        else:
            np.testing.assert_array_equal(win[:, 1:-1], want[:, 1:-1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="not 48x80 as the manifest says"):
        tf_decode_window_u8(tf.constant(data), ImageSpec(48, 80, 3, "jpeg"), tf.constant([0, 0]), tf.constant([8, 8]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="larger than the image size in the manifest"):
        tf_decode_window_u8(tf.constant(data), ImageSpec(40, 64, 3, "jpeg"), tf.constant([0, 0]), tf.constant([8, 8]))


def test_unit_and_none_normalisation_modes(data_uri):
    from pipeline.dataset import eval_dataset

    for mode, want in [("unit", lambda k: pixels(k) / np.float32(255)), ("none", lambda k: pixels(k))]:
        with eval_dataset(data_uri, config(f"loader.normalize={mode}"), split="val", rank=0, size=1,
                          batch_size=32, with_ids=True) as data:
            x, _, ids = take(data.dataset, 1)[0]
        for img, i in zip(x.numpy(), ids.numpy()):
            np.testing.assert_allclose(img, want(int(i.decode()[3:])).astype(np.float32), atol=1e-6)


# --- evaluation mode -----------------------------------------------------------------------

@pytest.mark.parametrize("split, size", [("val", 1), ("val", 2), ("val", 3), ("val", 5), ("train", 3),
                                         ("train", 4)])
def test_eval_sees_every_row_exactly_once_over_all_ranks(data_uri, cfg, split, size):
    from pipeline.dataset import eval_dataset

    union: List[str] = []
    per_rank = []
    for rank in range(size):
        with eval_dataset(data_uri, cfg, split=split, rank=rank, size=size, batch_size=4, with_ids=True) as data:
            batches = list(data.dataset)
            got = ids_of(batches)
            assert len(got) == data.num_rows
            assert all(b[0].shape[0] <= 4 for b in batches)
            # Exact pixels and labels: no augmentation in eval.
            for x, y, i in batches:
                for img, lab, iid in zip(x.numpy(), y.numpy(), i.numpy()):
                    k = int(iid.decode()[3:])
                    np.testing.assert_allclose(img, expected_norm(k), atol=1e-5)
                    assert lab == k % 3
            union += got
            per_rank.append(len(got))
    assert sorted(union) == split_ids(SPLITS, split)  # the whole split, no duplicates
    if size > sum(map(len, SPLITS[split])):  # more ranks than row groups: the extra ranks see nothing
        assert per_rank[sum(map(len, SPLITS[split])):] == [0] * (size - sum(map(len, SPLITS[split])))


def test_eval_can_be_iterated_again_in_the_same_order(data_uri, cfg):
    from pipeline.dataset import eval_dataset

    with eval_dataset(data_uri, cfg, split="val", rank=0, size=1, batch_size=3, with_ids=True) as data:
        first, second = ids_of(list(data.dataset)), ids_of(list(data.dataset))
    assert first == second == split_ids(SPLITS, "val")  # row groups in file order, rows in row-group order


def test_eval_without_ids_yields_image_label_pairs(data_uri, cfg):
    from pipeline.dataset import eval_dataset

    with eval_dataset(data_uri, cfg, split="val", rank=1, size=2, batch_size=64) as data:
        batches = list(data.dataset)
    assert len(batches) == 1 and len(batches[0]) == 2
    assert batches[0][0].shape == (data.num_rows, H, W, C)
    assert data.num_rows == 1 + 0  # val row groups 4, 1, 6 -> rank 1 holds only the 1-row group


# --- readers are closed ---------------------------------------------------------------------

def _reader_threads() -> int:
    return sum(1 for t in threading.enumerate() if "WorkerThread" in type(t).__name__ or "ventilat" in t.name.lower())


def test_readers_are_stopped_when_the_block_exits_even_mid_epoch(data_uri, cfg):
    from pipeline.dataset import eval_dataset, train_dataset

    before = _reader_threads()
    with train_dataset(data_uri, cfg, rank=0, size=1, batch_size=2, seed=1) as data:
        take(data.dataset, 3)
        assert data._source is not None and data._source.passes_started >= 1
    with eval_dataset(data_uri, cfg, split="val", rank=0, size=1, batch_size=2) as data:
        take(data.dataset, 1)
    assert _reader_threads() == before
    assert data._source._open == []


# --- errors that name the fix ----------------------------------------------------------------

def test_fewer_row_groups_than_processes_names_the_config_key(data_uri, cfg):
    from pipeline.dataset import train_dataset

    with pytest.raises(DataError) as e:
        with train_dataset(data_uri, cfg, rank=0, size=8, batch_size=4, seed=1):
            pass
    msg = str(e.value)
    assert "7 Parquet row groups but 8 training processes" in msg
    assert "ingest.max_train_procs >= 8 and re-run ingest" in msg
    assert "\n" not in msg


def test_missing_split_lists_the_splits_that_exist(data_uri, cfg):
    from pipeline.dataset import eval_dataset

    with pytest.raises(DataError, match=r"split 'test' not found .*this output has: train, val"):
        with eval_dataset(data_uri, cfg, split="test", rank=0, size=1, batch_size=4):
            pass


def test_schema_that_is_not_the_ingest_schema_is_refused(tmp_path, cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.dataset import train_dataset

    uri = write_ingest_layout(tmp_path / "o", {"train": [[3]]})
    part = tmp_path / "o" / "images" / "split=train" / "part-00000.parquet"
    t = pq.read_table(str(part)).drop(["label_index"])
    t = t.set_column(t.schema.get_field_index("height"), "height", pa.array(["8"] * 3))
    pq.write_table(t, str(part))
    with pytest.raises(DataError, match=r"split=train/part-00000.parquet does not have the ingest schema "
                                        r"\(missing column 'label_index'; column 'height' is string, expected int\)"):
        with train_dataset(uri, cfg, rank=0, size=1, batch_size=1, seed=1):
            pass


def test_rows_that_disagree_with_the_manifest_are_refused(tmp_path, cfg):
    from pipeline.dataset import train_dataset

    uri = write_ingest_layout(tmp_path / "o", {"train": [[3, 2]]}, manifest_extra={"splits": {"train": 9}})
    with pytest.raises(DataError, match="holds 5 rows but the manifest says 9"):
        with train_dataset(uri, cfg, rank=0, size=1, batch_size=1, seed=1):
            pass


def test_unlabelled_rows_cannot_be_trained_on(tmp_path, cfg):
    from pipeline.dataset import train_dataset

    uri = write_ingest_layout(tmp_path / "o", {"train": [[3, 2]]}, label_fn=lambda k: None if k == 3 else 0)
    with pytest.raises(DataError, match=r"split 'train' .* has rows without labels \(1\)"):
        with train_dataset(uri, cfg, rank=0, size=1, batch_size=1, seed=1):
            pass


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose IHDR (with a valid CRC) claims ``width x height``: a decompression bomb's header."""
    data = bytearray(png_bytes(pixels(0)))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("claimed, message", [
    ((30000, 30000), "stored PNG is larger than the image size in the manifest \\(re-run ingest\\)"),
    ((W, H + 1), "stored PNG is larger than the image size in the manifest"),
    ((W, H - 1), f"stored PNG is not {H}x{W} as the manifest says \\(re-run ingest\\)"),
])
def test_wrongly_sized_image_in_the_parquet_is_refused_before_decoding(tmp_path, cfg, claimed, message):
    import tensorflow as tf

    from pipeline.dataset import eval_dataset

    uri = write_ingest_layout(tmp_path / "o", {"val": [[3]]},
                              image_fn=lambda k: _png_claiming(*claimed) if k == 1 else png_bytes(pixels(k)))
    with eval_dataset(uri, cfg, split="val", rank=0, size=1, batch_size=8) as data:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            list(data.dataset)


# --- the real ingest output -------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_ingest(request):
    pytest.importorskip("pipeline.ingest", reason="pipeline.ingest is not written yet")
    return request.getfixturevalue("ingested_sample")


def test_real_ingest_output_trains_and_evaluates_exactly_once(real_ingest, sample_config):
    from pipeline.contracts import read_manifest
    from pipeline.dataset import eval_dataset, train_dataset

    m = read_manifest(real_ingest)
    h, w, c = m["image"]["height"], m["image"]["width"], m["image"]["channels"]
    size = sample_config.ingest.max_train_procs
    with train_dataset(real_ingest, sample_config, rank=size - 1, size=size, batch_size=8, seed=1) as data:
        assert data.steps_per_epoch == max(1, m["splits"]["train"] // (size * 8))
        x, y = take(data.dataset, data.steps_per_epoch + 1)[-1]
        assert x.shape == (8, h, w, c)
        assert set(y.numpy().tolist()) <= set(m["classes"].values())
    for split in [s for s, n in m["splits"].items() if n and s != "unlabeled"]:
        ids: List[str] = []
        for rank in range(2):
            with eval_dataset(real_ingest, sample_config, split=split, rank=rank, size=2, batch_size=16,
                              with_ids=True) as data:
                ids += ids_of(list(data.dataset))
        assert len(ids) == len(set(ids)) == m["splits"][split]

"""Fashion-MNIST export: real data in the class-folder layout ingest reads."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from pipeline import sample_data


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture()
def fake_src(tmp_path):
    rng = np.random.default_rng(0)
    for split, (imgs, labs) in sample_data.FILES.items():
        n = 12 if split == "train" else 5
        _write_idx(tmp_path / imgs, rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(tmp_path / labs, np.arange(n) % 10)
    return tmp_path


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(sample_data.read_idx(tmp_path / "x.gz"), arr)


def test_export_writes_class_folders_and_is_idempotent(tmp_path, fake_src):
    dest = tmp_path / "out"
    counts = sample_data.export_class_folders(dest, src=fake_src, limit=10)
    assert counts == {"train": 10, "test": 5}
    pngs = sorted(dest.glob("*/*/*.png"))
    assert len(pngs) == 15
    # Label 3 -> class "dress"; image i of train has label i % 10.
    assert (dest / "train" / "dress" / "train_00003.png").is_file()
    src_images, _ = sample_data.load_split(fake_src, "train")
    with Image.open(dest / "train" / "dress" / "train_00003.png") as im:
        np.testing.assert_array_equal(np.asarray(im), src_images[3])
    mtime = pngs[0].stat().st_mtime_ns
    assert sample_data.export_class_folders(dest, src=fake_src, limit=10) == counts
    assert pngs[0].stat().st_mtime_ns == mtime  # second call skipped the work


def test_real_fashion_mnist_is_obtainable():
    src = sample_data.locate_fashion_mnist()
    images, labels = sample_data.load_split(src, "test")
    assert images.shape == (10_000, 28, 28)
    assert sorted(np.unique(labels).tolist()) == list(range(10))

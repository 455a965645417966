"""Shared fixtures: one local[2] SparkSession for the whole run, temp dirs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Loopback only, set before any JVM starts.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["PYSPARK_PYTHON"] = sys.executable
os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The venv's bin/ (spark-submit, pixelmill) first on PATH for subprocess tests.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def test_config():
    from pipeline.config import load_config

    return load_config(
        ["local.yaml"],
        ["spark.ui_enabled=false", "spark.log_level=ERROR", "spark.conf.spark.sql.shuffle.partitions=4",
         "spark.conf.spark.driver.memory=2g"],
    )


@pytest.fixture(scope="session")
def spark(test_config):
    from pipeline.spark import build_session

    session = build_session(test_config.spark, app_suffix="tests")
    yield session
    session.stop()


@pytest.fixture()
def tmp_uri(tmp_path):
    """A fresh ``file://`` URI folder."""
    return "file://" + str(tmp_path)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# --- a small, learnable labelled corpus and its real ingest output -------------

SAMPLE_CLASSES = ("horizontal", "vertical", "diagonal")


def write_sample_corpus(root: Path, per_class: int = 48, size: int = 24, seed: int = 0) -> Path:
    """Class folders of RGB PNGs whose stripe orientation is the label (learnable in seconds)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for label in SAMPLE_CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            period = rng.integers(4, 8)
            phase = rng.integers(0, period)
            coord = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy}[label]
            stripes = ((coord + phase) // (period // 2)) % 2
            base = rng.integers(0, 256, size=3)
            img = stripes[..., None] * base + (1 - stripes[..., None]) * (255 - base)
            img = np.clip(img + rng.normal(0, 12, size=img.shape), 0, 255).astype("uint8")
            Image.fromarray(img, "RGB").save(root / label / f"{label}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def raw_sample(tmp_path_factory) -> Path:
    return write_sample_corpus(tmp_path_factory.mktemp("raw_sample"))


SAMPLE_INGEST_OVERRIDES = (
    "ingest.height=16", "ingest.width=16", "ingest.color_mode=RGB", "ingest.max_train_procs=2",
)


@pytest.fixture(scope="session")
def sample_config(test_config):
    from pipeline.config import load_config

    return load_config(
        ["local.yaml"],
        ["spark.ui_enabled=false", "spark.log_level=ERROR", *SAMPLE_INGEST_OVERRIDES,
         "train.epochs=3", "train.batch_size=16", "train.intra_op_threads=1", "train.inter_op_threads=1",
         "loader.workers_count=1", "loader.shuffle_buffer=256"],
    )


@pytest.fixture(scope="session")
def ingested_sample(spark, raw_sample, sample_config, tmp_path_factory) -> str:
    """URI of a real ingest output of :func:`raw_sample` (144 images, 3 classes, 16x16 RGB)."""
    from pipeline import ingest

    out = "file://" + str(tmp_path_factory.mktemp("ingested") / "out")
    ingest.run(spark, sample_config, input_uri="file://" + str(raw_sample), output_uri=out, mode="error")
    return out

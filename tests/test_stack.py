"""The pinned stack really works together on this machine."""
from __future__ import annotations

import importlib.metadata as md
import re
import tomllib

import numpy as np
import pytest


def _pins(repo_root):
    deps = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(m.groups() for m in (re.match(r"^([A-Za-z0-9_.\-]+)==([^;\s]+)", d) for d in deps) if m)


def test_installed_versions_equal_pins(repo_root):
    pins = _pins(repo_root)
    assert {"pyspark", "pyarrow", "numpy", "petastorm", "tensorflow-cpu", "horovod"} <= set(pins)
    drift = {name: (want, md.version(name)) for name, want in pins.items() if md.version(name) != want}
    assert drift == {}, f"installed versions drifted from pyproject pins (want, got): {drift}"


def test_pyspark_files_match_its_metadata():
    # pyspark-client (Airflow Spark provider >= 6) overwrites pyspark's files in place.
    import pyspark

    assert pyspark.__version__ == md.version("pyspark")


def test_protobuf_still_works_with_tensorflow():
    import tensorflow as tf

    assert tf.constant([1.0, 2.0]).numpy().sum() == 3.0
    from tensorflow.core.framework import graph_pb2

    assert graph_pb2.GraphDef().SerializeToString() == b""


def test_horovod_built_with_gloo_and_tensorflow():
    import horovod.tensorflow as hvd

    assert hvd.gloo_built()
    assert hvd.tensorflow_built() if hasattr(hvd, "tensorflow_built") else True


def test_pandas_udf_runs_with_arrow(spark):
    from pipeline.diagnostics import check_arrow_udf

    assert check_arrow_udf(spark) == sum(range(1, 101))


def test_petastorm_reads_spark_parquet_into_tf_data(spark, tmp_path):
    import tensorflow as tf
    from petastorm import make_batch_reader
    from petastorm.tf_utils import make_petastorm_dataset

    out = f"file://{tmp_path}/p"
    (spark.range(0, 50, numPartitions=2)
        .selectExpr("cast(id as int) as x", "cast(id * 2 as double) as y")
        .write.parquet(out))
    with make_batch_reader(out, num_epochs=1, reader_pool_type="dummy") as reader:
        ds = make_petastorm_dataset(reader)
        xs, ys = [], []
        for batch in ds:
            xs.extend(batch.x.numpy().tolist())
            ys.extend(batch.y.numpy().tolist())
    assert isinstance(ds, tf.data.Dataset)
    assert sorted(xs) == list(range(50))
    assert sorted(ys) == [2.0 * i for i in range(50)]


@pytest.mark.slow
def test_horovod_spark_run_two_ranks_over_gloo(spark):
    from pipeline.diagnostics import check_horovod

    results = check_horovod(num_proc=2, nics=["lo"], start_timeout=120)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["size"] == 2 and r["gloo"] for r in results)
    assert [r["sum"] for r in results] == [3.0, 3.0]  # 1 + 2
    w0, w1 = (np.array(r["weights"]) for r in sorted(results, key=lambda r: r["rank"]))
    np.testing.assert_array_equal(w0, w1)
    assert w0.size == 4 * 8 + 8 + 8 * 2 + 2


def test_protobuf_is_below_6_beside_mlflow():
    # mlflow 3.17 allows protobuf < 8; TensorFlow 2.18 needs < 6, which holds only when both are
    # installed in one resolver run (scripts/setup.sh).
    assert int(md.version("protobuf").split(".")[0]) < 6
    import mlflow

    assert mlflow.__version__ == _pins_from_file()["mlflow"]


def _pins_from_file():
    from pathlib import Path

    return _pins(Path(__file__).resolve().parents[1])

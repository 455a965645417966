"""The shared core: one filesystem interface, the stage contracts, fault injection.

These run without Spark (the ArrowFS side) except where a test says otherwise, so
they state what every stage relies on when it touches storage or reads another
stage's files.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline import contracts, faults
from pipeline.errors import ConfigError, DataError
from pipeline.fs import ArrowFS, HadoopFS, filesystem, is_under, join, to_uri


# --- pipeline.fs -------------------------------------------------------------------------

def test_local_uris_get_the_arrow_filesystem_and_jvm_only_schemes_need_a_session(tmp_path):
    assert isinstance(filesystem(str(tmp_path)), ArrowFS)
    with pytest.raises(ConfigError, match=r"abfs:// is served only through Spark's Hadoop filesystem"):
        filesystem("abfs://container@account.dfs.core.windows.net/x")


def test_write_bytes_replaces_atomically_and_leaves_no_temporary_files(tmp_path):
    fs = filesystem(str(tmp_path))
    target = join(to_uri(str(tmp_path)), "sub", "card.json")
    fs.write_json(target, {"v": 1})
    fs.write_json(target, {"v": 2})
    assert fs.read_json(target) == {"v": 2}
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["card.json"]


def test_entries_list_children_with_kind_and_size_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.bin").write_bytes(b"12345")
    fs = filesystem(str(tmp_path))
    got = [(e.name, e.is_dir, e.size) for e in fs.entries(to_uri(str(tmp_path)))]
    assert got == [("a.bin", False, 5), ("b", True, 0)]
    assert fs.entries(to_uri(str(tmp_path / "missing"))) == []


def test_create_exclusive_lets_exactly_one_of_many_racing_writers_win(tmp_path):
    fs = filesystem(str(tmp_path))
    uri = join(to_uri(str(tmp_path)), "snapshot")
    wins, losses = [], []

    def race(i: int) -> None:
        try:
            fs.create_exclusive(uri, str(i).encode())
            wins.append(i)
        except FileExistsError:
            losses.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 15
    assert fs.read_bytes(uri) == str(wins[0]).encode()


def test_any_file_skips_hidden_names_and_stops_at_the_first_visible_file(tmp_path):
    (tmp_path / "v" / ".hidden").mkdir(parents=True)
    (tmp_path / "v" / ".hidden" / "x.png").write_bytes(b"x")
    (tmp_path / "v" / "_tmp.png").write_bytes(b"x")
    fs = filesystem(str(tmp_path))
    skip = lambda name: name.startswith((".", "_"))  # noqa: E731
    assert not fs.any_file(to_uri(str(tmp_path / "v")), skip=skip)
    (tmp_path / "v" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "v" / "deep" / "er" / "y.png").write_bytes(b"y")
    assert fs.any_file(to_uri(str(tmp_path / "v")), skip=skip)


def test_parquet_counts_agree_between_the_arrow_and_the_hadoop_backend(spark, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"a": list(range(10))}), path, row_group_size=3)
    uri = to_uri(str(path))
    assert filesystem(uri).parquet_counts(uri) == HadoopFS(spark).parquet_counts(uri) == (4, 10)


def test_the_hadoop_backend_does_what_the_arrow_backend_does(spark, tmp_path):
    hfs, afs = HadoopFS(spark), filesystem(str(tmp_path))
    root = to_uri(str(tmp_path))
    hfs.write_bytes(join(root, "d", "f.bin"), b"\x00\x01payload")
    assert afs.read_bytes(join(root, "d", "f.bin")) == hfs.read_bytes(join(root, "d", "f.bin")) == b"\x00\x01payload"
    assert [e.name for e in hfs.entries(join(root, "d"))] == [e.name for e in afs.entries(join(root, "d"))] == ["f.bin"]
    with pytest.raises(FileExistsError):
        hfs.create_exclusive(join(root, "d", "f.bin"), b"again")
    hfs.delete(join(root, "d"))
    assert not afs.exists(join(root, "d"))


def test_is_under_compares_whole_path_segments():
    assert is_under("file:///data/raw/x", "file:///data/raw")
    assert is_under("file:///data/raw", "file:///data/raw/")
    assert not is_under("file:///data/raw2", "file:///data/raw")


# --- pipeline.contracts --------------------------------------------------------------------

MANIFEST = {
    "version": 1, "files_seen": 3, "accepted": 2, "rejected": {"corrupt": 1},
    "splits": {"train": 2}, "classes": {"dog": 1, "cat": 0},
    "image": {"height": 8, "width": 8, "channels": 3, "color_mode": "RGB", "format": "png"},
    "stats": {"mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0]}, "a_newer_writers_field": {"x": 1},
}


def _committed(tmp_path: Path, manifest: dict) -> str:
    out = tmp_path / "out"
    out.mkdir()
    (out / contracts.MANIFEST).write_text(json.dumps(manifest))
    (out / contracts.COMMIT_MARKER).write_text("{}")
    return to_uri(str(out))


def test_read_manifest_is_typed_keeps_unknown_fields_and_reads_like_the_json(tmp_path):
    m = contracts.read_manifest(_committed(tmp_path, MANIFEST))
    assert m.image.height == 8 and m["image"]["channels"] == 3
    assert m.class_order() == ("cat", "dog")
    assert m.get("a_newer_writers_field") == {"x": 1} and "stats" in m
    back = tmp_path / "copy"
    contracts.write_manifest(filesystem(str(back)), to_uri(str(back)), m)
    assert json.loads((back / contracts.MANIFEST).read_text()) == MANIFEST | {"version": 1}


@pytest.mark.parametrize("change, message", [
    ({"version": 7}, r"manifest version 7, expected 1: re-ingest with --mode overwrite"),
    ({"splits": None}, r"has a bad entry 'splits'.*re-run ingest"),
    ({"image": {"height": 8}}, r"has a bad entry 'image.width'.*re-run ingest"),
])
def test_read_manifest_names_the_bad_entry_and_what_to_rerun(tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        contracts.read_manifest(_committed(tmp_path, {**MANIFEST, **change}))


def test_read_manifest_refuses_a_missing_key_and_invalid_json(tmp_path):
    uri = _committed(tmp_path, {k: v for k, v in MANIFEST.items() if k != "image"})
    with pytest.raises(DataError, match=r"has no 'image': it was written by another tool"):
        contracts.read_manifest(uri)
    (tmp_path / "out" / contracts.MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match=r"is not valid JSON"):
        contracts.read_manifest(uri)


CARD = {"model_id": "0123456789abcdef", "classes": {"cat": 0, "dog": 1},
        "image": MANIFEST["image"], "normalization": {"mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0]}}


@pytest.mark.parametrize("change, message", [
    ({"classes": {"cat": 0, "dog": 2}}, r"class indices must be 0\.\.1, got \[0, 2\]"),
    ({"normalization": {"mean": [1.0], "std": [1.0]}}, r"normalization has 1 channel\(s\) but image has 3"),
    ({"model_id": None}, r"bad 'image' or 'normalization' entry|model_id"),
])
def test_read_model_card_checks_what_scoring_relies_on(tmp_path, change, message):
    fs = filesystem(str(tmp_path))
    (tmp_path / contracts.MODEL_CARD).write_text(json.dumps({**CARD, **change}))
    with pytest.raises(DataError, match=message):
        contracts.read_model_card(fs, to_uri(str(tmp_path)))


def test_model_card_round_trips(tmp_path):
    fs = filesystem(str(tmp_path))
    contracts.write_model_card(fs, to_uri(str(tmp_path)), {**CARD, "epochs_completed": 3})
    card = contracts.read_model_card(fs, to_uri(str(tmp_path)))
    assert card.model_id == CARD["model_id"] and card.epochs_completed == 3
    assert contracts.class_order(card.classes) == ("cat", "dog")


# --- pipeline.faults -------------------------------------------------------------------------

def test_a_fault_fires_only_at_its_point_and_context():
    plan = faults.parse("train.step:raise:rank=1:epoch=2")
    assert not faults.fire(plan, "train.step", rank=0, epoch=2, step=1)
    assert not faults.fire(plan, "score.batch", rank=1, epoch=2)
    with pytest.raises(RuntimeError, match="injected training fault at train.step"):
        faults.fire(plan, "train.step", rank=1, epoch=2, step=5)
    assert not faults.fire(None, "train.step", rank=1, epoch=2)


def test_once_fires_in_exactly_one_process_and_the_plan_pickles(tmp_path):
    plan = faults.parse("ingest.batch:drop_row:once", str(tmp_path / "marker"))
    plan = pickle.loads(pickle.dumps(plan))  # it travels to executors inside the closure
    code = ("import pickle, sys; from pipeline import faults; "
            "p = pickle.loads(bytes.fromhex(sys.argv[1])); print(faults.fire(p, 'ingest.batch'))")
    outs = [subprocess.run([sys.executable, "-c", code, pickle.dumps(plan).hex()], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.strip()
            for _ in range(3)]
    assert outs == ["True", "False", "False"]
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("text", ["explode", "ingest.batch:explode", "ingest.batch:raise:rank=x", "nowhere:raise"])
def test_a_bad_fault_spec_is_one_line_naming_the_variable(text):
    with pytest.raises(ConfigError, match=r"^PIXELMILL_FAULT_INJECT="):
        faults.parse(text)


def test_unarmed_environment_means_no_plan(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.armed() is None
    monkeypatch.setenv(faults.ENV, "score.batch:exit:partition=1:attempt=0")
    assert faults.armed() == faults.FaultPlan("score.batch", "exit", False, {"partition": 1, "attempt": 0}, None)


def test_progress_logs_the_tasks_counts_while_a_job_runs(spark, caplog):
    """``pipeline.spark.progress`` shows movement during a job: the accumulator's count against the
    total and the running stage's task counts, from a driver thread, while the job runs."""
    import logging
    import time as _time

    from pipeline.spark import progress

    n = spark.sparkContext.accumulator(0)

    def slow(batches):
        for pdf in batches:
            _time.sleep(0.3)
            n.add(len(pdf))
            yield pdf

    with caplog.at_level(logging.INFO, logger="pipeline.spark"), progress(
            spark, "test job", every_s=0.2, counter=n, total=40, unit="rows"):
        assert spark.range(0, 40, 1, 8).mapInPandas(slow, "id long").count() == 40
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test job: ")]
    assert lines and all("/40 rows" in line for line in lines) and any("tasks done" in line for line in lines)
    assert int(n.value) == 40  # every batch reported; the last lines come while the tasks still run

"""The ingest job end to end on real local[2] Spark and real Parquet.

Every file of a generated corpus of bad and odd files must end in images/ or
rejects/ with its exact expected outcome; reruns are identical; append adds
only new files and keeps splits and classes; partial writes are cleaned; a lost
row fails the job before anything is committed; a failed batch or a killed
Python worker is retried by Spark and the output equals a clean run's.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corpus import CORPUS_OVERRIDES, write_corpus, write_labelled, png_bytes, noise
from outputs import images_table, rejects_table, version_dir
from pipeline import faults, ingest
from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, InvariantError, OutputExistsError
from pipeline.commit import committed
from pipeline.contracts import COMMIT_MARKER, STAGING_PREFIX
from pipeline.fs import filesystem

SPARK_TEST = ("spark.ui_enabled=false", "spark.log_level=ERROR", "spark.conf.spark.sql.shuffle.partitions=4")


def cfg_with(*overrides: str):
    return load_config(["local.yaml"], [*SPARK_TEST, *CORPUS_OVERRIDES, "ingest.batch_rows=8", *overrides])


def uri(p: Path) -> str:
    return "file://" + str(p)


def images_rows(out: Path) -> List[Dict[str, Any]]:
    return images_table(out).to_pylist()


def rejects_rows(out: Path) -> List[Dict[str, Any]]:
    return rejects_table(out).to_pylist()


def manifest(out: Path) -> Dict[str, Any]:
    return json.loads((version_dir(out) / "_manifest.json").read_text())


def rel(source_path: str, root: Path) -> str:
    prefix = uri(root) + "/"
    assert source_path.startswith(prefix), source_path
    return source_path[len(prefix):]


def ordered_ids(out: Path) -> Dict[str, List[str]]:
    """image_id order per split, reading files in name order: the row order a reader sees."""
    res = {}
    for d in sorted((version_dir(out) / "images").iterdir()):
        if d.is_dir():
            res[d.name] = [i for f in sorted(d.glob("*.parquet")) for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]
    return res


def comparable(m: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in m.items()
            if k not in ("timings", "images_per_second", "output_uri", "row_groups", "listed_at")}


# --- the corpus, ingested once -------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus") / "raw"
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def corpus_run(spark, corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("corpus_out") / "out"
    summary = ingest.run(spark, cfg_with(), input_uri=uri(root), output_uri=uri(out), mode="error")
    return out, summary


def test_every_file_has_its_exact_outcome(corpus, corpus_run):
    root, expected = corpus
    out, _ = corpus_run
    imgs, rejs = images_rows(out), rejects_rows(out)
    got_accepted = {rel(r["source_path"], root): r["label"] for r in imgs}
    got_rejected = {rel(r["source_path"], root): r["reason"] for r in rejs}
    assert got_accepted == {k: e.label for k, e in expected.items() if e.reason is None}
    assert got_rejected == {k: e.reason for k, e in expected.items() if e.reason is not None}
    by_path = {rel(r["source_path"], root): r for r in rejs}
    ids = {rel(r["source_path"], root): r["image_id"] for r in imgs}
    for k, e in expected.items():
        data = (root / k).read_bytes()
        row_id = ids[k] if e.reason is None else by_path[k]["image_id"]
        # image_id is the sha256 of the original bytes; null only for a file that was never read
        assert row_id == (None if e.reason == "file_too_large" else hashlib.sha256(data).hexdigest()), k
        if e.reason == "duplicate":
            assert by_path[k]["image_id"] == ids[e.kept]
            assert by_path[k]["detail"] == f"duplicate of {uri(root)}/{e.kept}"
    assert by_path["cats/conflict.png"]["detail"] == "same bytes carry labels cats, dogs"
    assert all(r["detail"] and "\n" not in r["detail"] for r in rejs)


def test_manifest_reconciles_every_file(corpus, corpus_run):
    root, expected = corpus
    out, summary = corpus_run
    m = manifest(out)
    want_rejected = dict(Counter(e.reason for e in expected.values() if e.reason))
    n_ok = sum(1 for e in expected.values() if e.reason is None)
    assert m["files_seen"] == len(expected) == m["accepted"] + sum(m["rejected"].values())
    assert (m["accepted"], m["rejected"]) == (n_ok, want_rejected)
    assert m["classes"] == {"cats": 0, "dogs": 1}
    assert m["class_counts"] == dict(Counter(e.label for e in expected.values() if e.reason is None))
    assert sum(m["splits"].values()) == n_ok and set(m["splits"]) <= {"train", "val", "test"}
    assert m["image"] == {"height": 16, "width": 16, "channels": 3, "color_mode": "RGB", "format": "png"}
    assert m["input_uri"] == uri(root) and m["output_uri"] == uri(out)
    assert m["config"]["max_pixels"] == 1_000_000
    snap = committed(filesystem(uri(out)), uri(out))
    assert snap is not None and snap.version == summary["version"] and snap.root == summary["version_root"]
    assert {f.kind: 0 for f in snap.files} == {"images": 0, "rejects": 0}
    assert sum(f.rows for f in snap.files) == m["files_seen"]  # the snapshot's files hold every input file
    assert not (out / COMMIT_MARKER).exists()
    for k in ("files_seen", "accepted", "rejected", "splits", "classes", "class_counts"):
        assert summary[k] == m[k]
    assert summary["output"] == uri(out) and summary["images_per_second"] > 0


def test_stored_images_are_exactly_what_training_reads(corpus, corpus_run):
    out, _ = corpus_run
    m = manifest(out)
    rows = images_rows(out)
    for r in rows:
        with Image.open(io.BytesIO(r["image"])) as x:
            assert (x.format, x.size, x.mode) == ("PNG", (16, 16), "RGB")
        assert (r["height"], r["width"], r["channels"], r["format"]) == (16, 16, 3, "png")
        assert r["label_index"] == m["classes"][r["label"]]
    # per-channel stats of the train split, recomputed from the stored bytes
    train = np.stack([np.asarray(Image.open(io.BytesIO(r["image"]))) for r in rows if r["split"] == "train"])
    px = train.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(m["stats"]["mean"], px.mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(m["stats"]["std"], px.std(axis=0), atol=1e-4)
    assert m["stats"]["pixels"] == px.shape[0]


def test_labels_never_form_output_paths(corpus_run):
    out, _ = corpus_run
    dirs = sorted(p.name for p in (version_dir(out) / "images").iterdir() if p.is_dir())
    assert set(dirs) <= {"split=train", "split=val", "split=test"}
    names = [str(p.relative_to(out)) for p in out.rglob("*")]
    assert not [n for n in names if "cats" in n or "dogs" in n]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_row_groups_shard_the_train_split_and_mix_classes(ingested_sample):
    out = Path(ingested_sample[len("file://"):])
    m = manifest(out)
    need = 4 * m["config"]["max_train_procs"]
    counted = {}
    for split in m["splits"]:
        files = sorted((version_dir(out) / "images" / f"split={split}").glob("*.parquet"))
        counted[split] = sum(pq.ParquetFile(f).num_row_groups for f in files)
        if split == "train":
            for f in files:
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    labels = pf.read_row_group(g, columns=["label"]).column(0).to_pylist()
                    if len(labels) >= 6:
                        assert len(set(labels)) > 1, f"row group {g} of {f.name} holds one class: {labels}"
    assert counted == m["row_groups"]
    assert counted["train"] >= need
    assert sum(m["splits"].values()) == m["accepted"] == 144


def test_rerun_gives_identical_rows_in_identical_order(spark, corpus, corpus_run, tmp_path):
    root, _ = corpus
    out1, _ = corpus_run
    out2 = tmp_path / "again"
    ingest.run(spark, cfg_with(), input_uri=uri(root), output_uri=uri(out2), mode="error")
    key = lambda r: r["image_id"]  # noqa: E731
    assert sorted(images_rows(out1), key=key) == sorted(images_rows(out2), key=key)
    assert sorted(rejects_rows(out1), key=lambda r: r["source_path"]) == sorted(rejects_rows(out2), key=lambda r: r["source_path"])
    assert ordered_ids(out1) == ordered_ids(out2)
    m1, m2 = manifest(out1), manifest(out2)
    assert comparable(m1) | {"output_uri": None} == comparable(m2) | {"output_uri": None}
    # a rerun against the committed output is refused unless asked to overwrite
    with pytest.raises(OutputExistsError, match="--mode overwrite"):
        ingest.run(spark, cfg_with(), input_uri=uri(root), output_uri=uri(out2), mode="error")
    assert manifest(out2) == m2


# --- layouts and label sources ------------------------------------------------------------

def test_layout_splits_are_honoured(spark, tmp_path):
    raw = tmp_path / "raw"
    files = {}
    for split_dir, split in (("train", "train"), ("validation", "val"), ("val", "val"), ("test", "test")):
        labelled = write_labelled(raw / split_dir, {"a": 2, "b": 2}, seed=len(files) + 1, size=12)
        files.update({f"{split_dir}/{k}": (split, lab) for k, lab in labelled.items()})
    (raw / "train" / "loose.png").write_bytes(png_bytes(noise(99)))
    out = tmp_path / "out"
    ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="error")
    got = {rel(r["source_path"], raw): (r["split"], r["label"]) for r in images_rows(out)}
    assert got == files
    assert [(rel(r["source_path"], raw), r["reason"]) for r in rejects_rows(out)] == [("train/loose.png", "no_label")]
    m = manifest(out)
    assert m["splits"] == {"test": 4, "train": 4, "val": 8}
    assert m["row_groups"]["train"] >= 4


def test_val_is_carved_from_train_when_the_layout_has_no_val_folder(spark, tmp_path):
    # Fashion-MNIST-style input: train/ and test/ only. Training needs a val split.
    from pipeline.ingest import layout

    raw = tmp_path / "raw"
    train = write_labelled(raw / "train", {"a": 30, "b": 30}, seed=7, size=12)
    test = write_labelled(raw / "test", {"a": 3, "b": 3}, seed=8, size=12)
    out = tmp_path / "out"
    ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="error")
    rows = images_rows(out)
    carve = layout.carve_fractions({"train": 0.8, "val": 0.1, "test": 0.1})
    expected = {}
    for r in rows:
        name = rel(r["source_path"], raw)
        expected[name] = "test" if name.startswith("test/") else layout.hash_split(r["image_id"], carve, 0)
    assert {rel(r["source_path"], raw): r["split"] for r in rows} == expected
    assert len(rows) == len(train) + len(test)
    m = manifest(out)
    assert m["val_carved_from_train"] is True
    assert m["splits"]["test"] == len(test)
    assert 0 < m["splits"]["val"] < m["splits"]["train"]
    assert m["splits"]["train"] + m["splits"]["val"] == len(train)

    out2 = tmp_path / "out2"
    ingest.run(spark, cfg_with("ingest.carve_val_from_train=false"), input_uri=uri(raw), output_uri=uri(out2),
               mode="error")
    assert manifest(out2)["splits"] == {"test": len(test), "train": len(train)}
    assert manifest(out2)["val_carved_from_train"] is False


def test_val_folder_detection_matches_what_spark_would_read(spark, tmp_path):
    # Decided from the filesystem (no Spark job): a first-level val/validation folder, any case,
    # counts only when it holds a file Spark's scan would yield (hidden names do not).
    from pipeline.fs import filesystem

    fs = filesystem(uri(tmp_path), spark)

    def layout(name: str, files: List[str]) -> str:
        root = tmp_path / name
        (root / "train" / "a").mkdir(parents=True)
        (root / "train" / "a" / "x.png").write_bytes(b"x")
        for f in files:
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            (root / f).write_bytes(b"x")
        return uri(root)

    assert ingest.layout_has_val(fs, layout("upper", ["VAL/a/x.png"])) is True
    assert ingest.layout_has_val(fs, layout("deep", ["Validation/a/b/c/x.png"])) is True
    assert ingest.layout_has_val(fs, layout("hidden_only", ["val/.DS_Store", "val/_tmp/x.png", "val/a/.x.png"])) is False
    assert ingest.layout_has_val(fs, layout("hidden_then_visible", ["val/_tmp/x.png", "val/b/x.png"])) is True
    assert ingest.layout_has_val(fs, layout("none", ["test/a/x.png", "a/val/x.png"])) is False
    assert ingest.layout_has_val(fs, layout("file_named_val", ["val"])) is False
    assert ingest.layout_has_val(fs, layout("glob chars [1] {a,b} *?", ["val/a/x.png"])) is True
    assert ingest.layout_has_val(fs, layout("glob chars [2] {a,b} *?", ["test/a/x.png"])) is False


def test_input_bytes_come_from_the_file_index_without_a_job(spark, tmp_path):
    # The scan's task sizes are planned from the listing's total bytes; summing lengths with a
    # Spark job instead would read the whole input once more (and plan it with the wrong sizes).
    root = tmp_path / "raw"
    sizes = [3, 1000, 70_000]
    for i, n in enumerate(sizes):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{i}.bin").write_bytes(b"z" * n)
    from pipeline.ingest import extract

    raw = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(uri(root))
    sc = spark.sparkContext
    sc.setJobGroup("listed-bytes-probe", "probe")
    try:
        assert extract.listed_bytes(raw) == sum(sizes)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert list(sc.statusTracker().getJobIdsForGroup("listed-bytes-probe")) == []


def test_unlabeled_mode(spark, tmp_path):
    raw = tmp_path / "raw"
    write_labelled(raw, {"x": 2}, seed=7, size=12)
    (raw / "top.png").write_bytes(png_bytes(noise(70)))
    (raw / "test").mkdir()
    (raw / "test" / "t.png").write_bytes(png_bytes(noise(71)))
    out = tmp_path / "out"
    s = ingest.run(spark, cfg_with("ingest.label_source=none"), input_uri=uri(raw), output_uri=uri(out), mode="error")
    got = {rel(r["source_path"], raw): (r["split"], r["label"], r["label_index"]) for r in images_rows(out)}
    assert got == {"x/img_7_000.png": ("unlabeled", None, None), "x/img_7_001.png": ("unlabeled", None, None),
                   "top.png": ("unlabeled", None, None), "test/t.png": ("test", None, None)}
    assert (s["classes"], s["class_counts"], s["rejected"]) == ({}, {}, {})


def test_csv_manifest_labels(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(4):
        (raw / f"f{i}.png").write_bytes(png_bytes(noise(200 + i)))
    csv = tmp_path / "labels.csv"
    csv.write_text(f"path,label\nf0.png,red\n/f1.png,blue\n{uri(raw)}/f2.png,red\nmissing.png,red\n")
    out = tmp_path / "out"
    s = ingest.run(spark, cfg_with("ingest.label_source=manifest", f"ingest.manifest_uri={csv}"),
                   input_uri=uri(raw), output_uri=uri(out), mode="error")
    got = {rel(r["source_path"], raw): (r["label"], r["label_index"]) for r in images_rows(out)}
    assert got == {"f0.png": ("red", 1), "f1.png": ("blue", 0), "f2.png": ("red", 1)}
    assert [(rel(r["source_path"], raw), r["reason"]) for r in rejects_rows(out)] == [("f3.png", "no_label")]
    assert s["files_seen"] == 4


# --- append --------------------------------------------------------------------------

def test_append_adds_only_new_files_and_keeps_splits_and_classes(spark, tmp_path):
    raw = tmp_path / "raw"
    write_labelled(raw, {"cats": 6, "dogs": 6}, seed=1, size=12)
    (raw / "cats" / "bad.png").write_bytes(b"")
    out = tmp_path / "out"
    first = ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="error")
    before = {r["image_id"]: r for r in images_rows(out)}
    m1 = manifest(out)
    first_files = {p: p.stat().st_mtime_ns for p in (out / "_v").rglob("*.parquet")}

    # new files: 3 new cats, a renamed copy of an existing cat, a copy of an existing cat under dogs
    write_labelled(raw, {"cats": 3}, seed=2, size=12)
    shutil.copy(raw / "cats" / "img_1_000.png", raw / "cats" / "copy_of_000.png")
    shutil.copy(raw / "cats" / "img_1_001.png", raw / "dogs" / "conflicting_001.png")
    s = ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="append")
    after = {r["image_id"]: r for r in images_rows(out)}
    assert {k: after[k] for k in before} == before  # same rows, same splits, same label_index
    assert len(after) == len(before) + 3
    m2 = manifest(out)
    assert m2["classes"] == m1["classes"] == {"cats": 0, "dogs": 1}
    # every file was modified within ingest.unchanged_margin_s of the first listing: all are read
    assert s["run"] == {"files_seen": 18, "accepted": 3, "already_ingested": 13, "files_read": 18,
                        "rejected": {"already_ingested": 13, "duplicate": 1, "label_conflict": 1}}
    assert m2["files_seen"] == first["files_seen"] + 5 == m2["accepted"] + sum(m2["rejected"].values())
    assert m2["rejected"] == {"empty": 1, "duplicate": 1, "label_conflict": 1}
    rej = {rel(r["source_path"], raw): r for r in rejects_rows(out)}
    assert rej["cats/copy_of_000.png"]["detail"] == f"duplicate of {uri(raw)}/cats/img_1_000.png"
    assert rej["dogs/conflicting_001.png"]["reason"] == "label_conflict"
    assert sum(m2["splits"].values()) == len(after)
    # Only the new files were written: the new version's folder holds this run's 3 images and 2
    # rejects; the first version's files are listed by the new snapshot, untouched.
    assert s["written"] == {"accepted": 3, "rejected": 2, "incremental": True}
    own = Path(s["version_root"][len("file://"):])
    assert sum(pq.read_metadata(f).num_rows for f in (own / "images").rglob("*.parquet")) == 3
    assert sum(pq.read_metadata(f).num_rows for f in (own / "rejects").rglob("*.parquet")) == 2
    assert {p: p.stat().st_mtime_ns for p in first_files} == first_files
    new_groups = Counter({d.name.split("=")[1]: sum(pq.read_metadata(f).num_row_groups for f in d.glob("*.parquet"))
                          for d in (own / "images").iterdir() if d.is_dir()})
    assert m2["row_groups"] == dict(Counter(m1["row_groups"]) + new_groups)

    # appending the same input again changes nothing
    ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="append")
    assert {r["image_id"]: r for r in images_rows(out)} == after
    assert comparable(manifest(out)) | {"appends": 0, "run": None, "timings": None} == \
        comparable(m2) | {"appends": 0, "run": None, "timings": None}

    # a new class is refused unless allowed, and the output is untouched
    write_labelled(raw, {"birds": 2}, seed=3, size=12)
    with pytest.raises(DataError, match="allow_new_classes=true"):
        ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="append")
    assert {r["image_id"]: r for r in images_rows(out)} == after
    ingest.run(spark, cfg_with("ingest.allow_new_classes=true"), input_uri=uri(raw), output_uri=uri(out), mode="append")
    assert manifest(out)["classes"] == {"cats": 0, "dogs": 1, "birds": 2}
    assert sorted(r["label_index"] for r in images_rows(out) if r["label"] == "birds") == [2, 2]


@pytest.mark.parametrize("listing", ["spark", "executors"])
def test_append_reads_only_the_files_new_or_modified_since_the_last_listing(spark, tmp_path, listing):
    """Stored files older than the previous listing are already_ingested without being read: one
    overwritten in place with junk (its old mtime kept) still counts as ingested. New files that
    arrive with old mtimes (cp -p, rsync -a) and modified files are read; counts add up. The same
    whether Spark's file index lists the input or executor tasks do."""
    import time

    def cfg_for(*overrides: str):
        return cfg_with(f"ingest.listing={listing}", *overrides)

    def age(*paths: Path) -> None:
        old = time.time() - 86_400
        for p in paths:
            os.utime(p, (old, old))

    raw = tmp_path / "raw"
    write_labelled(raw, {"cats": 6, "dogs": 6}, seed=1, size=12)
    (raw / "cats" / "empty.png").write_bytes(b"")
    age(*[p for p in raw.rglob("*") if p.is_file()])
    out = tmp_path / "out"
    first = ingest.run(spark, cfg_for(), input_uri=uri(raw), output_uri=uri(out), mode="error")
    assert first["run"]["files_read"] == 13 and set(manifest(out)["listed_at"]) == {uri(raw)}

    victim = raw / "dogs" / "img_1_000.png"
    victim.write_bytes(b"junk, not a PNG")
    age(victim)
    new = [raw / rel for rel in write_labelled(raw, {"cats": 2}, seed=2, size=12)]
    (raw / "dogs" / "new_empty.png").write_bytes(b"")
    (raw / "dogs" / "huge.png").write_bytes(b"\0" * (1024 * 1024 + 1))
    age(*new, raw / "dogs" / "new_empty.png", raw / "dogs" / "huge.png")
    modified = raw / "cats" / "img_1_001.png"
    modified.write_bytes(png_bytes(noise(777, 12, 12)))
    s = ingest.run(spark, cfg_for("ingest.max_file_mb=1"), input_uri=uri(raw), output_uri=uri(out), mode="append")
    # read: the 2 new files and the modified one; 11 stored files and the stored empty one are not
    assert s["run"] == {"files_seen": 17, "accepted": 3, "already_ingested": 12, "files_read": 3,
                        "rejected": {"already_ingested": 12, "empty": 1, "file_too_large": 1}}
    m = manifest(out)
    assert m["files_seen"] == 13 + 5 == m["accepted"] + sum(m["rejected"].values())
    assert {rel(r["source_path"], raw) for r in rejects_rows(out) if r["reason"] == "empty"} == {
        "cats/empty.png", "dogs/new_empty.png"}
    stored = Counter(rel(r["source_path"], raw) for r in images_rows(out))
    assert stored["cats/img_2_000.png"] == stored["cats/img_2_001.png"] == 1
    assert stored["cats/img_1_001.png"] == 2  # its first bytes and its new ones
    assert stored["dogs/img_1_000.png"] == 1  # the junk was never read
    assert s["timings"]["unchanged_s"] > 0

    # nothing modified since: nothing is read, every file is already ingested, nothing is written
    age(modified)
    s = ingest.run(spark, cfg_for("ingest.max_file_mb=1"), input_uri=uri(raw), output_uri=uri(out), mode="append")
    assert s["run"] == {"files_seen": 17, "accepted": 0, "already_ingested": 17, "files_read": 0,
                        "rejected": {"already_ingested": 17}}
    assert s["written"] == {"accepted": 0, "rejected": 0, "incremental": True}
    assert manifest(out)["files_seen"] == m["files_seen"]

    # ingest.skip_unchanged=false reads every file: the junk is found
    s = ingest.run(spark, cfg_for("ingest.skip_unchanged=false"), input_uri=uri(raw), output_uri=uri(out),
                   mode="append")
    assert s["run"]["files_read"] == 17
    assert [r["reason"] for r in rejects_rows(out) if rel(r["source_path"], raw) == "dogs/img_1_000.png"] == [
        "not_an_image"]


def test_an_appended_output_is_read_whole_by_the_loader_and_by_scoring(spark, tmp_path):
    """After incremental appends a split spans several version folders: the training loader (petastorm
    over the listed files) and scoring's reader each see every stored row exactly once."""
    from pipeline.contracts import read_manifest, resolve_ingest, split_folders
    from pipeline.dataset import eval_dataset, split_layout
    from pipeline.score.driver import read_split

    raw = tmp_path / "raw"
    out = tmp_path / "out"
    write_labelled(raw, {"a": 12, "b": 12}, seed=21, size=12)
    ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="error")
    for seed in (22, 23):  # two appends: three folders per split
        write_labelled(raw, {"a": 8, "b": 8}, seed=seed, size=12)
        assert ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out),
                          mode="append")["written"]["accepted"] == 16

    m = read_manifest(uri(out))
    stored = images_rows(out)
    assert len(stored) == m["accepted"] == 56 and len({r["image_id"] for r in stored}) == 56
    data = resolve_ingest(uri(out))
    spans = {s: len(split_folders(data, s)) for s, n in m["splits"].items() if n}
    assert max(spans.values()) == 3
    cfg = cfg_with()
    for split, n in m["splits"].items():
        if not n:
            continue
        layout = split_layout(uri(out), split)
        assert layout.num_rows == n and len(layout.folders) == spans[split]
        ids: List[str] = []
        for rank in range(2):
            with eval_dataset(uri(out), cfg, split=split, rank=rank, size=2, batch_size=4, with_ids=True) as d:
                ids += [b.decode() for batch in d.dataset for b in batch[2].numpy().tolist()]
        assert sorted(ids) == sorted(r["image_id"] for r in stored if r["split"] == split)
    scored = read_split(spark, data, "all", m["splits"]).select("image_id", "split").collect()
    assert sorted((r["image_id"], r["split"]) for r in scored) == sorted((r["image_id"], r["split"]) for r in stored)


# --- reliability ------------------------------------------------------------------------

def test_a_crashed_writers_files_are_never_read_and_staging_debris_is_cleaned(spark, tmp_path):
    raw = tmp_path / "raw"
    write_labelled(raw, {"a": 3, "b": 3}, seed=5, size=12)
    out = tmp_path / "out"
    crashed = out / "_v" / "00000001-0123456789ab" / "images" / "split=train"  # a writer killed before its commit
    crashed.mkdir(parents=True)
    (crashed / "part-00000-stale.parquet").write_bytes(b"half a file")
    debris = tmp_path / f"{STAGING_PREFIX}out-0123456789ab"  # what the earlier, rename-based commit left
    (debris / "images").mkdir(parents=True)
    ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="error")
    assert not debris.exists()
    assert "stale" not in str(version_dir(out))
    assert len(images_rows(out)) == 6 and manifest(out)["files_seen"] == 6
    ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="overwrite")
    assert not list(out.rglob("*stale*"))  # a later commit removes the unreferenced folder
    assert len(images_rows(out)) == 6


def test_a_folder_of_foreign_files_is_refused_not_deleted(spark, tmp_path):
    raw = tmp_path / "raw"
    write_labelled(raw, {"a": 2, "b": 2}, seed=5, size=12)
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not pixelmill's")
    with pytest.raises(DataError, match=r"holds files but no _snapshots/ .* not a pixelmill output \(choose an empty"):
        ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_a_lost_row_fails_the_job_and_commits_nothing(spark, tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_labelled(raw, {"a": 3, "b": 3}, seed=6, size=12)
    out = tmp_path / "out"
    monkeypatch.setenv(faults.ENV, "ingest.batch:drop_row:once")
    monkeypatch.setenv(faults.MARKER_ENV, str(tmp_path / "marker"))
    with pytest.raises(InvariantError, match="6 listed but 5 accepted"):
        ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(out), mode="error")
    assert committed(filesystem(uri(out)), uri(out)) is None
    assert not [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_check_invariant():
    ingest.check_invariant(5, 3, {"corrupt": 1, "empty": 1})
    with pytest.raises(InvariantError, match=r"files_seen \(5\) != accepted \(3\) \+ rejected \(1\) = 4"):
        ingest.check_invariant(5, 3, {"corrupt": 1})


def test_bad_arguments_fail_before_writing(spark, tmp_path):
    raw = tmp_path / "raw"
    write_labelled(raw, {"a": 1}, seed=8, size=12)
    with pytest.raises(ConfigError, match="--mode must be one of error, overwrite, append"):
        ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(tmp_path / "o"), mode="merge")
    with pytest.raises(ConfigError, match="overlap"):
        ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(raw / "out"), mode="error")
    with pytest.raises(DataError, match="not an existing folder"):
        ingest.run(spark, cfg_with(), input_uri=uri(tmp_path / "nope"), output_uri=uri(tmp_path / "o"), mode="error")
    with pytest.raises(ConfigError, match="'ingest.manifest_uri': .*nope.csv does not exist"):
        ingest.run(spark, cfg_with("ingest.label_source=manifest", f"ingest.manifest_uri={tmp_path / 'nope.csv'}"),
                   input_uri=uri(raw), output_uri=uri(tmp_path / "o"), mode="error")
    with pytest.raises(ConfigError, match="PIXELMILL_FAULT_INJECT"):
        os.environ[faults.ENV] = "explode"
        try:
            ingest.run(spark, cfg_with(), input_uri=uri(raw), output_uri=uri(tmp_path / "o"), mode="error")
        finally:
            del os.environ[faults.ENV]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_cli_bad_flag_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipeline", "ingest", "--input", str(tmp_path), "--output",
                        str(tmp_path / "o"), "--mode", "merge"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "--mode" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault,configs", [("ingest.batch:raise:once", ["local.yaml"]),
                                           ("ingest.batch:kill:once", ["local.yaml"]),
                                           ("ingest.batch:kill:once", [])])
def test_spark_retries_a_failed_batch_and_output_equals_a_clean_run(fault, configs, corpus, corpus_run, tmp_path):
    """A real spark job on the default master (conf/local.yaml's, or the base config's when no overlay
    is given) with one batch failing or its worker SIGKILLed: the default retries it."""
    root, _ = corpus
    clean_out, _ = corpus_run
    out = tmp_path / "out"
    marker = tmp_path / "marker"
    env = {**os.environ, faults.ENV: fault, faults.MARKER_ENV: str(marker)}
    sets = [*SPARK_TEST, "spark.conf.spark.driver.memory=1g", *CORPUS_OVERRIDES, "ingest.batch_rows=8"]
    cmd = [sys.executable, "-m", "pipeline", "ingest", "--input", str(root), "--output", str(out),
           "--log-level", "WARNING"]
    for c in configs:
        cmd += ["--config", c]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists()  # the fault really fired
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    key = lambda x: x["image_id"]  # noqa: E731
    assert sorted(images_rows(out), key=key) == sorted(images_rows(clean_out), key=key)
    assert sorted(rejects_rows(out), key=lambda x: x["source_path"]) == \
        sorted(rejects_rows(clean_out), key=lambda x: x["source_path"])
    m, mc = manifest(out), manifest(clean_out)
    for k in ("files_seen", "accepted", "rejected", "splits", "classes", "class_counts", "stats"):
        assert m[k] == mc[k] == (summary[k] if k in summary else m[k])


# --- the commit: a driver SIGKILLed at each step ------------------------------------------------

def _snapshot_rows(out: Path) -> int:
    found = committed(filesystem(uri(out)), uri(out))
    return sum(f.rows for f in found.files)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode,step", [("overwrite", 1), ("overwrite", 2), ("overwrite", 3), ("append", 2)])
def test_a_driver_killed_at_each_commit_step_leaves_the_old_version_or_the_new_one(spark, tmp_path, mode, step):
    """Kill the whole driver process group (Python and its JVM) at a commit step: the output reads as
    exactly the old version or exactly the new one, reconciling, and the next run succeeds."""
    import signal

    raw = tmp_path / "raw"
    write_labelled(raw, {"a": 3, "b": 3}, seed=11, size=12)
    out = tmp_path / "out"
    keep = ("ingest.retain_versions=1",)  # step 3 (the prune) has an old version to delete
    ingest.run(spark, cfg_with(*keep), input_uri=uri(raw), output_uri=uri(out), mode="error")
    old = manifest(out)
    write_labelled(raw, {"a": 2, "b": 1}, seed=12, size=12)  # 3 new files for the second run
    cmd = [sys.executable, "-m", "pipeline", "ingest", "--input", str(raw), "--output", str(out), "--mode", mode,
           "--config", "local.yaml", "--log-level", "WARNING"]
    for s in (*SPARK_TEST, *CORPUS_OVERRIDES, "ingest.batch_rows=8", *keep):
        cmd += ["--set", s]
    env = {**os.environ, faults.ENV: f"commit:kill:step={step}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    _, err = proc.communicate(timeout=540)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the JVM the driver started dies with it, as in a node loss
    assert proc.returncode == -signal.SIGKILL, err[-3000:]

    m = manifest(out)
    assert m["files_seen"] == (old["files_seen"] if step == 1 else old["files_seen"] + 3)
    assert (m == old) == (step == 1)
    images, rejects = images_rows(out), rejects_rows(out)
    assert len(images) == m["accepted"] and len(rejects) == sum(m["rejected"].values())
    assert _snapshot_rows(out) == len(images) + len(rejects) == m["files_seen"]

    again = ingest.run(spark, cfg_with(*keep), input_uri=uri(raw), output_uri=uri(out), mode=mode)
    assert manifest(out)["files_seen"] == again["files_seen"] == old["files_seen"] + 3
    assert len(list((out / "_snapshots").iterdir())) == 1
    listed = {f.path.split("/")[1] for f in committed(filesystem(uri(out)), uri(out)).files}
    # an append's version lists the folders of the ones before it; nothing unlisted is left behind
    assert {p.name for p in (out / "_v").iterdir()} == listed and len(listed) == (1 if mode == "overwrite" else 3)


# --- listing on executors ------------------------------------------------------------------

def test_a_listing_on_executors_ingests_exactly_what_sparks_file_index_does(spark, corpus, corpus_run, tmp_path):
    """Every odd file of the corpus (empty, too large, hidden, nested, non-image, duplicate, long name)
    gets the same row whether Spark's file index lists it on the driver or executor tasks do."""
    root, _ = corpus
    out, _ = corpus_run
    alt = tmp_path / "executors"
    summary = ingest.run(spark, cfg_with("ingest.listing=executors"), input_uri=uri(root), output_uri=uri(alt))
    key = lambda r: r["image_id"]  # noqa: E731
    assert sorted(images_rows(alt), key=key) == sorted(images_rows(out), key=key)
    by_path = lambda r: r["source_path"]  # noqa: E731
    assert sorted(rejects_rows(alt), key=by_path) == sorted(rejects_rows(out), key=by_path)
    m1, m2 = manifest(out), manifest(alt)
    assert m2["config"].pop("listing") == "executors" and m1["config"].pop("listing") == "spark"
    assert comparable(m2) | {"output_uri": None} == comparable(m1) | {"output_uri": None}
    assert summary["files_seen"] == m1["files_seen"]


def test_a_path_manifest_ingests_exactly_its_files_with_its_labels_and_splits(spark, tmp_path):
    """``--input-list``: only the listed files are ingested (others in the folder are not even
    counted), the list's label and split win over the folders, relative and absolute paths both
    work, and a listed file that is not there is an ``unreadable`` reject, not a crash."""
    import pyarrow as pa

    raw = tmp_path / "raw"
    write_labelled(raw, {"cats": 3, "dogs": 3}, seed=4, size=12)
    (raw / "cats" / "empty.png").write_bytes(b"")
    rows = [
        ("cats/img_4_000.png", "tabby", "val"),      # the list's label and split win
        ("cats/img_4_001.png", None, "TRAIN"),       # label from the folder, split given (any case)
        (str(raw / "dogs" / "img_4_000.png"), None, None),  # absolute path: label from the folder, hashed split
        (uri(raw) + "/dogs/img_4_001.png", "dogs", "test"),
        ("cats/empty.png", None, None),
        ("cats/gone.png", "cats", None),
    ]
    listed = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": [r[0] for r in rows], "label": [r[1] for r in rows],
                             "split": [r[2] for r in rows]}), listed)
    out = tmp_path / "out"
    s = ingest.run(spark, cfg_with(), input_uri=uri(raw), input_list=uri(listed), output_uri=uri(out))
    got = {rel(r["source_path"], raw): (r["label"], r["split"]) for r in images_rows(out)}
    assert got["cats/img_4_000.png"] == ("tabby", "val")
    assert got["cats/img_4_001.png"] == ("cats", "train")
    assert got["dogs/img_4_001.png"] == ("dogs", "test")
    assert got["dogs/img_4_000.png"][0] == "dogs" and set(got) == {
        "cats/img_4_000.png", "cats/img_4_001.png", "dogs/img_4_000.png", "dogs/img_4_001.png"}
    rejected = {rel(r["source_path"], raw): (r["reason"], r["detail"]) for r in rejects_rows(out)}
    assert rejected["cats/empty.png"][0] == "empty"
    assert rejected["cats/gone.png"][0] == "unreadable" and "gone.png" in rejected["cats/gone.png"][1]
    assert s["files_seen"] == 6 == s["accepted"] + sum(s["rejected"].values())
    assert manifest(out)["input_list"] == uri(listed)

    # a CSV list beside the images: --input defaults to the list's folder
    csv = raw / "list.csv"
    csv.write_text("path,label\ncats/img_4_002.png,\ndogs/img_4_002.png,hound\n")
    out2 = tmp_path / "out2"
    ingest.run(spark, cfg_with(), input_list=uri(csv), output_uri=uri(out2))
    assert sorted((rel(r["source_path"], raw), r["label"]) for r in images_rows(out2)) == [
        ("cats/img_4_002.png", "cats"), ("dogs/img_4_002.png", "hound")]


def test_a_bad_path_manifest_fails_before_writing_with_one_line_naming_the_fix(spark, tmp_path):
    raw = tmp_path / "raw"
    write_labelled(raw, {"cats": 1}, seed=5, size=12)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="does not exist"):
        ingest.run(spark, cfg_with(), input_list=uri(tmp_path / "nope.csv"), output_uri=uri(out))
    (tmp_path / "nopath.csv").write_text("file,label\ncats/img_5_000.png,cats\n")
    with pytest.raises(ConfigError, match="no 'path' column"):
        ingest.run(spark, cfg_with(), input_uri=uri(raw), input_list=uri(tmp_path / "nopath.csv"), output_uri=uri(out))
    (tmp_path / "badsplit.csv").write_text("path,split\ncats/img_5_000.png,holdout\n")
    with pytest.raises(ConfigError, match="1 rows have a split other than train, val, test"):
        ingest.run(spark, cfg_with(), input_uri=uri(raw), input_list=uri(tmp_path / "badsplit.csv"), output_uri=uri(out))
    assert not out.exists()
    with pytest.raises(ConfigError, match="ingest.listing=spark"):
        ingest.run(spark, cfg_with("ingest.listing=executors"), input_uri="abfs://c@acct.dfs.core.windows.net/raw",
                   output_uri=uri(out))

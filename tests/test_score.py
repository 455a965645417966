"""Distributed scoring: every row scored once, equal to a single-process predict, clear errors, safe reruns.

Real local[2] Spark, real Parquet, a real Keras 3 model trained for a moment in a
fixture and saved as the training stage exports it (``model/model.keras`` +
``model.json`` per docs/contracts.md). The ingest output is written here in the
contract's layout so these tests do not depend on the ingest stage's code.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, DataError, OutputExistsError
from pipeline.schema import IMAGE_COLUMNS, IMAGE_FIELDS, spark_schema
from outputs import version_dir
from pipeline.contracts import COMMIT_MARKER, STAGING_PREFIX

CLASSES = ("diagonal", "horizontal", "vertical")
SIZE = 16
SPLIT_SIZES = {"train": 60, "val": 12, "test": 30}
CONTRACT_COLUMNS = ("image_id", "source_path", "label", "split", "pred_label", "pred_index", "probability",
                    "top_k_labels", "top_k_probabilities", "model_id", "scored_at")
TOP_K = 2


# --- an ingest output in the contract's layout ---------------------------------------

def _stripes(label: str, rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    coord = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy}[label]
    period = int(rng.integers(4, 8))
    stripes = ((coord + int(rng.integers(0, period))) // (period // 2)) % 2
    base = rng.integers(0, 256, size=channels)
    img = stripes[..., None] * base + (1 - stripes[..., None]) * (255 - base)
    img = np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype("uint8")
    return img[..., 0] if channels == 1 else img


def _encoded(arr: np.ndarray, fmt: str = "png") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def write_ingest_output(spark, root: Path, *, split_sizes: Dict[str, int], labelled: bool = True,
                        channels: int = 3, seed: int = 0, bad_rows: Sequence[Tuple[int, bytes]] = (),
                        fmt: str = "png") -> str:
    """A committed ingest output (images/split=*/, _manifest.json, marker); returns its URI."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows, pixels = [], []
    for split, n in split_sizes.items():
        for i in range(n):
            label = CLASSES[i % len(CLASSES)]
            arr = _stripes(label, rng, SIZE, channels)
            data = _encoded(arr, fmt)
            rows.append({
                "image_id": hashlib.sha256(data).hexdigest(),
                "source_path": f"file:///raw/{split}/{label}/{label} {i:03d} ünï.png",
                "label": label if labelled else None,
                "label_index": CLASSES.index(label) if labelled else None,
                "split": split, "height": SIZE, "width": SIZE, "channels": channels, "format": fmt,
                "image": data,
            })
            if split == "train":
                pixels.append(arr.reshape(-1, channels).astype(np.float64))
    for idx, data in bad_rows:  # stored bytes that no longer decode to SIZE x SIZE
        rows[idx]["image"] = data
    pdf = pd.DataFrame(rows, columns=list(IMAGE_COLUMNS))
    pdf["label_index"] = pdf["label_index"].astype("Int32")
    for c in ("height", "width", "channels"):
        pdf[c] = pdf[c].astype("int32")
    uri = "file://" + str(root)
    (spark.createDataFrame(pdf, schema=spark_schema(IMAGE_FIELDS)).repartition(3)
     .write.partitionBy("split").parquet(uri + "/images"))
    px = np.concatenate(pixels) if pixels else np.full((1, channels), 127.5)
    manifest = {
        "version": 1, "input_uri": "file:///raw", "output_uri": uri,
        "files_seen": len(rows), "accepted": len(rows), "rejected": {},
        "splits": dict(split_sizes),
        "class_counts": {c: sum(1 for r in rows if r["label"] == c) for c in CLASSES} if labelled else {},
        "classes": {c: i for i, c in enumerate(CLASSES)} if labelled else {},
        "image": {"height": SIZE, "width": SIZE, "channels": channels, "color_mode": "L" if channels == 1 else "RGB",
                  "format": fmt},
        "stats": {"mean": px.mean(axis=0).tolist(), "std": px.std(axis=0).tolist()},
        "row_groups": {s: 1 for s in split_sizes}, "config": {}, "timings": {"total_s": 0.0},
        "images_per_second": 0.0,
    }
    (root / "_manifest.json").write_text(json.dumps(manifest))
    (root / COMMIT_MARKER).write_text("{}")
    return uri


def read_images(data_uri: str, split: Optional[str] = None):
    """The ingest rows as pandas, read with pyarrow (no pipeline code)."""
    import pyarrow.dataset as ds

    table = ds.dataset(str(version_dir(data_uri) / "images"), format="parquet", partitioning="hive").to_table()
    pdf = table.to_pandas()
    pdf["split"] = pdf["split"].astype(str)
    return pdf if split is None else pdf[pdf["split"] == split].reset_index(drop=True)


# --- a model exported the way the training stage exports it ------------------------------

def export_model(model, model_dir: Path, *, manifest: dict, classes: Dict[str, int]) -> str:
    (model_dir / "model").mkdir(parents=True, exist_ok=True)
    path = model_dir / "model" / "model.keras"
    model.save(path)
    meta = {
        "model_id": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        "created_utc": "2026-11-28T00:00:00Z",
        "classes": classes,
        "image": manifest["image"],
        "normalization": {"mean": manifest["stats"]["mean"], "std": manifest["stats"]["std"]},
        "ingest_manifest_sha256": "0" * 64, "epochs_completed": 2,
        "metrics": {}, "stack": {}, "config": {},
    }
    (model_dir / "model.json").write_text(json.dumps(meta))
    return "file://" + str(model_dir)


def reference_inputs(pdf, manifest: dict) -> np.ndarray:
    """Decode with Pillow and normalise by hand: the single-process reference path."""
    from PIL import Image

    x = np.stack([np.asarray(Image.open(io.BytesIO(b)), dtype=np.float32) for b in pdf["image"]])
    if x.ndim == 3:
        x = x[..., None]
    mean = np.asarray(manifest["stats"]["mean"], np.float32)
    std = np.asarray(manifest["stats"]["std"], np.float32)
    return (x - mean) / std


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg():
    return load_config(["local.yaml"], ["spark.ui_enabled=false", "spark.log_level=ERROR",
                                        "score.batch_size=16", f"score.top_k={TOP_K}"])


@pytest.fixture(scope="module")
def data(spark, tmp_path_factory) -> str:
    return write_ingest_output(spark, tmp_path_factory.mktemp("ingest") / "out", split_sizes=SPLIT_SIZES)


@pytest.fixture(scope="module")
def manifest(data) -> dict:
    return json.loads(Path(data[len("file://"):], "_manifest.json").read_text())


@pytest.fixture(scope="module")
def keras_model(data, manifest):
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(CLASSES), activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    train = read_images(data, "train")
    y = np.asarray([CLASSES.index(v) for v in train["label"]])
    # A short fit: predictions are confident and varied, with some mistakes left.
    model.fit(reference_inputs(train, manifest), y, epochs=3, batch_size=16, verbose=0)
    return model


@pytest.fixture(scope="module")
def model_dir(keras_model, manifest, tmp_path_factory) -> str:
    return export_model(keras_model, tmp_path_factory.mktemp("models") / "run1", manifest=manifest,
                        classes={c: i for i, c in enumerate(CLASSES)})


@pytest.fixture(scope="module")
def reference(data, manifest, keras_model):
    """Single-process ``model.predict`` over every ingest row, keyed by image_id."""
    pdf = read_images(data)
    probs = keras_model.predict(reference_inputs(pdf, manifest), batch_size=64, verbose=0)
    return {iid: (row, p) for iid, row, p in zip(pdf["image_id"], pdf.to_dict("records"), probs)}


@pytest.fixture(scope="module")
def scored_all(spark, cfg, data, model_dir, tmp_path_factory):
    from pipeline import score

    out = "file://" + str(tmp_path_factory.mktemp("scored") / "all")
    summary = score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="all", mode="error")
    return summary, out


def predictions(spark, out: str):
    return spark.read.parquet(str(version_dir(out) / "predictions")).toPandas()


# --- tests -----------------------------------------------------------------------------------

def test_every_row_is_scored_once_and_equals_single_process_predict(spark, scored_all, reference):
    summary, out = scored_all
    pdf = predictions(spark, out)
    n = sum(SPLIT_SIZES.values())
    assert (summary["rows"], summary["rows_in"], summary["rejected"]) == (n, n, 0)
    assert len(pdf) == n
    assert pdf["image_id"].is_unique
    assert set(pdf["image_id"]) == set(reference)
    assert sorted(pdf.columns) == sorted(CONTRACT_COLUMNS)
    assert pdf["scored_at"].nunique() == 1
    assert set(pdf["model_id"]) == {summary["model_id"]}
    for r in pdf.itertuples():
        src, p = reference[r.image_id]
        assert (r.source_path, r.label, r.split) == (src["source_path"], src["label"], src["split"])
        order = np.argsort(-p, kind="stable")
        np.testing.assert_allclose(r.top_k_probabilities, p[order[:TOP_K]], rtol=1e-4, atol=1e-5)
        assert r.probability == pytest.approx(float(p.max()), rel=1e-4, abs=1e-5)
        if p[order[0]] - p[order[1]] > 1e-4:  # a near-tie may legitimately flip between batchings
            assert r.pred_index == order[0]
            assert list(r.top_k_labels) == [CLASSES[i] for i in order[:TOP_K]]
        assert r.pred_label == CLASSES[r.pred_index] == r.top_k_labels[0]


def test_predictions_are_partitioned_by_the_configured_column(scored_all):
    _, out = scored_all
    folders = sorted(p.name for p in (version_dir(out) / "predictions").iterdir() if p.is_dir())
    assert folders == ["split=test", "split=train", "split=val"]


def test_metrics_equal_those_computed_by_hand(spark, scored_all):
    summary, out = scored_all
    pdf = predictions(spark, out)
    k = len(CLASSES)
    cm = np.zeros((k, k), dtype=int)
    for label, pred in zip(pdf["label"], pdf["pred_label"]):
        cm[CLASSES.index(label), CLASSES.index(pred)] += 1
    got = json.loads((version_dir(out) / "_metrics.json").read_text())
    assert got["classes"] == list(CLASSES)
    assert got["confusion_matrix"] == cm.tolist()
    assert got["rows"] == len(pdf) == cm.sum()
    assert got["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    f1s = []
    for i, c in enumerate(CLASSES):
        tp = cm[i, i]
        prec = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        rec = tp / cm[i, :].sum()
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        assert got["per_class"][c] == pytest.approx({"precision": prec, "recall": rec, "f1": f1,
                                                      "support": int(cm[i, :].sum())})
    assert got["macro_f1"] == pytest.approx(np.mean(f1s))
    assert summary["metrics"]["accuracy"] == pytest.approx(got["accuracy"])
    assert 0 < np.trace(cm) < cm.sum() or np.trace(cm) == cm.sum()  # sanity: the model learned something
    from PIL import Image

    with Image.open(version_dir(out) / "confusion_matrix.png") as im:
        assert im.format == "PNG" and min(im.size) >= 200


def test_model_subfolder_unpartitioned_single_split(spark, cfg, data, model_dir, scored_all, tmp_uri):
    from pipeline import score

    cfg2 = cfg.model_copy(update={"score": cfg.score.model_copy(update={"partition_by": None})})
    out = tmp_uri + "/test_only"
    summary = score.run(spark, cfg2, data_uri=data, model_uri=model_dir + "/model", output_uri=out,
                        split="test", mode="error")
    assert summary["rows"] == SPLIT_SIZES["test"]
    root = version_dir(out) / "predictions"
    assert not [p for p in root.iterdir() if p.is_dir()]
    got = predictions(spark, out).set_index("image_id")
    full = predictions(spark, scored_all[1]).set_index("image_id")
    assert set(got["split"]) == {"test"}
    np.testing.assert_allclose(got["probability"], full.loc[got.index, "probability"], rtol=1e-5, atol=1e-6)


def test_unlabeled_data_gets_null_labels_and_no_metrics(spark, cfg, keras_model, manifest, tmp_path):
    from pipeline import score

    data = write_ingest_output(spark, tmp_path / "unlabeled", split_sizes={"unlabeled": 20}, labelled=False, seed=3)
    um = json.loads((tmp_path / "unlabeled" / "_manifest.json").read_text())
    um["stats"] = manifest["stats"]
    model_dir = export_model(keras_model, tmp_path / "m", manifest=um, classes={c: i for i, c in enumerate(CLASSES)})
    out = "file://" + str(tmp_path / "scored")
    with pytest.raises(DataError, match=r"split 'test' .* holds no images \(it has: unlabeled=20\).*--split all"):
        score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="test", mode="error")
    assert not (tmp_path / "scored").exists()  # the checks failed before anything was written
    summary = score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="all", mode="error")
    pdf = predictions(spark, out)
    assert (summary["rows"], summary["metrics"], summary["metrics_uri"]) == (20, None, None)
    assert len(pdf) == 20 and pdf["label"].isna().all() and set(pdf["split"]) == {"unlabeled"}
    assert sorted(p.name for p in version_dir(out).iterdir() if not p.name.startswith(".")) == ["predictions"]
    assert sorted(p.name for p in (tmp_path / "scored").iterdir()) == ["_snapshots", "_v"]


def _edit_model_json(src_dir: str, dst: Path, **changes) -> str:
    import shutil

    shutil.copytree(src_dir[len("file://"):], dst)
    meta = json.loads((dst / "model.json").read_text())
    meta.update(changes)
    (dst / "model.json").write_text(json.dumps(meta))
    return "file://" + str(dst)


@pytest.mark.parametrize("case, exc, needle", [
    ("missing", DataError, r"no trained model at .*expected <model-dir>/model/model\.keras"),
    ("checkpoints_only", DataError, r"no trained model .*checkpoints but no exported model"),
    ("size", DataError, r"image size differs: model \w+ expects 32x32 .* holds 16x16: ingest the data with "
                        r"ingest.height=32 ingest.width=32"),
    ("channels", DataError, r"channels differ: model \w+ expects 1 but .* holds 3 \(RGB\): .*ingest.color_mode=L"),
    ("classes", DataError, r"class mapping differs: 'diagonal' is index 0 in .* but 1 in model"),
    ("unknown_class", DataError, r"class mapping differs: data class 'vertical' is unknown to model"),
    ("replaced", DataError, r"does not match its model.json \(model_id 0123456789abcdef"),
    ("overlap", ConfigError, r"--output .* overlaps --data"),
    ("split", ConfigError, r"--split must be one of train, val, test, unlabeled, all \(got 'bogus'\)"),
])
def test_model_and_data_disagreements_are_one_line_errors_and_write_nothing(
        spark, cfg, data, model_dir, tmp_path, case, exc, needle):
    from pipeline import score

    out = "file://" + str(tmp_path / "out")
    split = "test"
    model = model_dir
    if case == "missing":
        model = "file://" + str(tmp_path / "nothing")
    elif case == "checkpoints_only":
        (tmp_path / "half" / "checkpoints" / "epoch-0001").mkdir(parents=True)
        model = "file://" + str(tmp_path / "half")
    elif case == "size":
        model = _edit_model_json(model_dir, tmp_path / "m", image={"height": 32, "width": 32, "channels": 3,
                                                                     "color_mode": "RGB", "format": "png"})
    elif case == "channels":
        model = _edit_model_json(model_dir, tmp_path / "m", image={"height": SIZE, "width": SIZE, "channels": 1,
                                                                     "color_mode": "L", "format": "png"},
                                 normalization={"mean": [0.0], "std": [1.0]})
    elif case == "classes":
        model = _edit_model_json(model_dir, tmp_path / "m", classes={"horizontal": 0, "diagonal": 1, "vertical": 2})
    elif case == "unknown_class":
        model = _edit_model_json(model_dir, tmp_path / "m", classes={"diagonal": 0, "horizontal": 1, "other": 2})
    elif case == "replaced":
        model = _edit_model_json(model_dir, tmp_path / "m", model_id="0123456789abcdef")
    elif case == "overlap":
        out = data + "/predictions"
    elif case == "split":
        split = "bogus"
    data_files = sorted(Path(data[len("file://"):]).rglob("*"))
    with pytest.raises(exc, match=needle) as info:
        score.run(spark, cfg, data_uri=data, model_uri=model, output_uri=out, split=split, mode="overwrite")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
    assert sorted(Path(data[len("file://"):]).rglob("*")) == data_files  # overwrite never touched the data


def test_existing_output_is_refused_unless_overwrite(spark, cfg, data, model_dir, scored_all):
    from pipeline import score

    _, out = scored_all
    before = sorted((version_dir(out) / "predictions").rglob("*.parquet"))
    with pytest.raises(OutputExistsError, match=r"already exists: pass --mode overwrite to replace it, or --mode append"):
        score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="all", mode="error")
    assert sorted((version_dir(out) / "predictions").rglob("*.parquet")) == before


def test_append_scores_only_rows_without_a_prediction_and_metrics_cover_them_all(spark, cfg, model_dir, tmp_path):
    """Nightly scoring of a grown dataset: only the new rows are predicted; the version lists the
    earlier predictions; metrics equal those of scoring everything at once."""
    from pipeline import score
    from pipeline.contracts import prediction_folders, resolve_scores

    small = write_ingest_output(spark, tmp_path / "d1", split_sizes={"test": 9}, seed=3)
    grown = write_ingest_output(spark, tmp_path / "d2", split_sizes={"test": 15}, seed=3)  # the same 9 + 6 new
    out = "file://" + str(tmp_path / "scores")
    run = dict(model_uri=model_dir, output_uri=out, split="test")
    s1 = score.run(spark, cfg, data_uri=small, mode="append", **run)  # nothing committed yet: every row
    assert s1["written"] == {"predictions": 9, "rejected": 0, "incremental": False}
    first = {p: p.stat().st_mtime_ns for p in (version_dir(out) / "predictions").rglob("*.parquet")}

    s2 = score.run(spark, cfg, data_uri=grown, mode="append", **run)
    assert s2["written"] == {"predictions": 6, "rejected": 0, "incremental": True}
    assert (s2["rows"], s2["rows_in"], s2["rejected"]) == (15, 15, 0)
    own = Path(s2["version_root"][len("file://"):]) / "predictions"
    assert spark.read.parquet(str(own)).count() == 6
    assert {p: p.stat().st_mtime_ns for p in first} == first  # the first predictions stay where they were
    assert len(prediction_folders(resolve_scores(out))) == 2
    got = score.read_predictions(spark, out).toPandas()
    full_out = "file://" + str(tmp_path / "full")
    full = score.run(spark, cfg, data_uri=grown, model_uri=model_dir, output_uri=full_out, split="test", mode="error")
    want = predictions(spark, full_out)
    assert sorted(got["image_id"]) == sorted(want["image_id"])  # each row once
    assert s2["metrics"] == full["metrics"]
    assert json.loads((version_dir(out) / "_metrics.json").read_text())["confusion_matrix"] == \
        json.loads((version_dir(full_out) / "_metrics.json").read_text())["confusion_matrix"]

    # nothing new: a version with the same rows and metrics
    s3 = score.run(spark, cfg, data_uri=grown, mode="append", **run)
    assert s3["written"]["predictions"] == 0 and s3["rows"] == 15 and s3["metrics"] == full["metrics"]
    # another split or model cannot extend these predictions
    with pytest.raises(ConfigError, match=r"holds split 'test', this run has 'all'"):
        score.run(spark, cfg, data_uri=grown, model_uri=model_dir, output_uri=out, split="all", mode="append")
    assert resolve_scores(out).version == s3["version"]


def _set_fault(spark, value: Optional[str]) -> None:
    # '<action>:<partition>': every attempt of that partition fails after its first output batch (the
    # session retries a failed task, as local.yaml's master does). score.run reads the variable on
    # the driver (in this process) when it plans the tasks.
    from pipeline import faults

    if value is None:
        os.environ.pop(faults.ENV, None)
        return
    action, _, partition = value.partition(":")
    os.environ[faults.ENV] = f"score.batch:{action}:partition={partition}"


def test_interrupted_run_then_rerun_has_no_duplicates_and_no_missing_rows(spark, cfg, data, model_dir, scored_all,
                                                                           tmp_path):
    import shutil

    from pipeline import score

    out_dir = tmp_path / "scored"
    out = "file://" + str(out_dir)
    for fault in ("raise:1", "exit:0"):  # a task error, then a Python worker that dies mid-partition
        _set_fault(spark, fault)
        try:
            with pytest.raises(Exception, match=r"injected scoring fault|Python worker exited|crashed|EOFError"):
                score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="all", mode="error")
        finally:
            _set_fault(spark, None)
        assert not out_dir.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]

    # Debris a killed driver would leave: an uncommitted version folder, and a staging folder of
    # the earlier rename-based commit.
    some_part = next((version_dir(scored_all[1]) / "predictions").rglob("*.parquet"))
    crashed = out_dir / "_v" / "00000001-deadbeef0000" / "predictions" / "split=test"
    crashed.mkdir(parents=True)
    shutil.copy(some_part, crashed / "part-00000-debris.parquet")
    stale = tmp_path / f"{STAGING_PREFIX}scored-deadbeef0000"
    (stale / "predictions").mkdir(parents=True)
    shutil.copy(some_part, stale / "predictions" / "part-00000-debris.parquet")

    summary = score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="all", mode="error")
    got = predictions(spark, out)
    clean = predictions(spark, scored_all[1])
    assert summary["rows"] == len(got) == len(clean)
    assert got["image_id"].is_unique
    assert set(got["image_id"]) == set(clean["image_id"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert "deadbeef" not in str(version_dir(out))  # the crashed writer's files are never read
    a = got.set_index("image_id").sort_index()
    b = clean.set_index("image_id").sort_index()
    assert (a["pred_label"] == b["pred_label"]).mean() > 0.95  # near-ties aside, the same answers
    np.testing.assert_allclose(a["probability"], b["probability"], rtol=1e-4, atol=1e-5)


def _bomb(width: int = 50000, height: int = 50000, color_type: int = 2, bits: int = 8) -> bytes:
    """A PNG signature + IHDR claiming ``width x height`` pixels, and no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, bits, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
            + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + b"\x00" * 64)


def test_batch_header_check_accepts_exactly_what_the_per_image_check_and_decoder_accept():
    """The vectorised bomb check: only exact-size 8-bit PNGs of the right channels reach the fast decoder."""
    import pyarrow as pa

    from pipeline.imaging.stored import ImageSpec, _binary_layout, check_header, png_headers_match

    rng = np.random.default_rng(1)
    rgb = _encoded(_stripes("vertical", rng, SIZE, 3))
    cases = {
        "rgb ok": (rgb, True),
        "bomb": (_bomb(), False),
        "other size": (_encoded(_stripes("vertical", rng, SIZE + 1, 3)), False),
        "grey in an rgb dataset": (_encoded(_stripes("vertical", rng, SIZE, 1)), False),
        "rgba": (_encoded(np.dstack([_stripes("vertical", rng, SIZE, 3), np.full((SIZE, SIZE), 255, np.uint8)])), False),
        "16-bit header": (_bomb(SIZE, SIZE, bits=16), False),
        "palette header": (_bomb(SIZE, SIZE, color_type=3), False),
        "not an image": (b"not an image", False),
        "empty": (b"", False),
        "truncated ihdr": (rgb[:20], False),
        "null": (None, False),
        "rgb ok again": (rgb, True),
    }
    spec = ImageSpec(SIZE, SIZE, 3)
    arr = pa.array([blob for blob, _ in cases.values()], pa.binary())
    for sliced in (arr, arr.slice(1)):  # Arrow slices start at an offset into the shared buffers
        data, offsets, valid = _binary_layout(sliced)
        got = (png_headers_match(data, offsets, spec) & valid).tolist()
        assert got == [ok for _, ok in list(cases.values())[len(arr) - len(sliced):]]
    for name, (blob, ok) in cases.items():
        if ok:
            check_header(blob, spec)  # the per-image check agrees: no exception
    assert png_headers_match(*_binary_layout(arr)[:2], ImageSpec(SIZE, SIZE, 3, "jpeg")).sum() == 0


def test_jpeg_header_check_accepts_exactly_the_jpegs_the_fast_decoder_may_take():
    from PIL import Image

    from pipeline.imaging.stored import ImageSpec, jpeg_headers_match

    rng = np.random.default_rng(2)
    rgb = _encoded(_stripes("vertical", rng, SIZE, 3), "jpeg")
    buf = io.BytesIO()
    Image.fromarray(_stripes("vertical", rng, SIZE, 3)).save(buf, "JPEG", progressive=True)
    cases = {
        "rgb ok": (rgb, True),
        "progressive ok": (buf.getvalue(), True),
        "other size": (_encoded(_stripes("vertical", rng, SIZE + 8, 3), "jpeg"), False),
        "grey in an rgb dataset": (_encoded(_stripes("vertical", rng, SIZE, 1), "jpeg"), False),
        "a png": (_encoded(_stripes("vertical", rng, SIZE, 3)), False),
        "truncated before the frame": (rgb[:10], False),
        "not an image": (b"\xff\xd8 not a jpeg at all", False),
        "empty": (b"", False),
        "null": (None, False),
    }
    got = jpeg_headers_match([b for b, _ in cases.values()], ImageSpec(SIZE, SIZE, 3, "jpeg")).tolist()
    assert dict(zip(cases, got)) == {k: ok for k, (_, ok) in cases.items()}
    assert not jpeg_headers_match([rgb], ImageSpec(SIZE, SIZE, 3, "png")).any()


def test_jpeg_data_is_scored_like_single_process_predict_on_the_pillow_decoded_pixels(spark, cfg, keras_model,
                                                                                      tmp_path):
    """JPEG storage: the batch decoder gives Pillow's pixels, so scoring equals ``model.predict``
    on the decoded uint8 images; a row that does not decode is a reject, not a crash."""
    from pipeline import score

    data = write_ingest_output(spark, tmp_path / "jpeg", split_sizes={"test": 40}, fmt="jpeg", seed=4,
                               bad_rows=[(5, b"\xff\xd8 cut short")])
    manifest = json.loads((tmp_path / "jpeg" / "_manifest.json").read_text())
    model = export_model(keras_model, tmp_path / "model", manifest=manifest,
                         classes={c: i for i, c in enumerate(CLASSES)})
    out = "file://" + str(tmp_path / "scored")
    summary = score.run(spark, cfg, data_uri=data, model_uri=model, output_uri=out, split="test", mode="error")
    assert (summary["rows_in"], summary["rows"], summary["rejected"]) == (40, 39, 1)
    pdf = read_images(data)
    good = pdf[pdf["image"].map(lambda b: not b.startswith(b"\xff\xd8 cut"))].reset_index(drop=True)
    want = dict(zip(good["image_id"], keras_model.predict(reference_inputs(good, manifest), verbose=0)))
    got = predictions(spark, out)
    assert set(got["image_id"]) == set(want)
    for r in got.itertuples():
        assert r.probability == pytest.approx(float(want[r.image_id].max()), rel=1e-4, abs=1e-5)
    # the workers' batch decoder (the fast path) gives exactly Pillow's pixels
    import pyarrow as pa

    from pipeline.imaging.stored import ImageSpec, decode_images

    pixels, ok, errors = decode_images(pa.array(list(good["image"]), pa.binary()), ImageSpec(SIZE, SIZE, 3, "jpeg"))
    assert ok.all() and not errors
    pillow = reference_inputs(good, {"stats": {"mean": [0.0] * 3, "std": [1.0] * 3}})
    np.testing.assert_array_equal(np.asarray(pixels), pillow)


def test_undecodable_and_oversized_images_are_rejected_not_lost(spark, cfg, keras_model, manifest, tmp_path):
    from pipeline import score

    # A PNG header claiming 50000 x 50000 pixels (a decompression bomb), bytes that are no image at all,
    # a PNG whose header is right but whose pixel data is cut short, and a greyscale PNG among RGB ones.
    bomb = _bomb()
    rng = np.random.default_rng(9)
    truncated = _encoded(_stripes("diagonal", rng, SIZE, 3))
    truncated = truncated[:len(truncated) // 2]
    grey = _encoded(_stripes("diagonal", rng, SIZE, 1))
    data = write_ingest_output(spark, tmp_path / "d", split_sizes={"test": 10}, seed=5,
                               bad_rows=[(2, bomb), (7, b"not an image"), (4, truncated), (8, grey)])
    dm = json.loads((tmp_path / "d" / "_manifest.json").read_text())
    dm["stats"] = manifest["stats"]
    model_dir = export_model(keras_model, tmp_path / "m", manifest=dm, classes={c: i for i, c in enumerate(CLASSES)})
    rows = read_images(data)
    out = "file://" + str(tmp_path / "scored")
    summary = score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="test", mode="error")
    assert (summary["rows_in"], summary["rows"], summary["rejected"]) == (10, 6, 4)
    rej = spark.read.parquet(str(version_dir(out) / "rejects")).toPandas()
    bad_ids = {bytes(b): i for i, b in zip(rows["image_id"], rows["image"])}
    got = {r.image_id: r.reason for r in rej.itertuples()}
    assert got == {bad_ids[b"not an image"]: "undecodable", bad_ids[truncated]: "undecodable",
                   bad_ids[bomb]: "wrong_size", bad_ids[grey]: "wrong_shape"}
    assert "50000x50000" in rej.set_index("image_id").loc[bad_ids[bomb], "detail"]
    pred = predictions(spark, out)
    pred_ids = set(pred["image_id"])
    assert pred_ids | set(rej["image_id"]) == set(rows["image_id"]) and not pred_ids & set(rej["image_id"])
    assert json.loads((version_dir(out) / "_metrics.json").read_text())["rows"] == 6
    # The good rows of the batches that held bad ones are scored exactly as a single process would.
    good = rows[rows["image_id"].isin(pred_ids)].reset_index(drop=True)
    expected = keras_model.predict(reference_inputs(good, dm), verbose=0).max(axis=1)
    got_p = pred.set_index("image_id").loc[list(good["image_id"]), "probability"].to_numpy()
    np.testing.assert_allclose(got_p, expected, rtol=1e-4, atol=1e-5)


def test_real_ingest_output_is_scored_row_for_row(spark, cfg, ingested_sample, tmp_path):
    """The ingest stage's own output (conftest ``ingested_sample``), not a hand-written layout."""
    import keras

    from pipeline import score

    man = json.loads((version_dir(ingested_sample) / "_manifest.json").read_text())
    img = man["image"]
    keras.utils.set_random_seed(11)
    model = keras.Sequential([
        keras.Input((img["height"], img["width"], img["channels"])),
        keras.layers.Conv2D(6, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(man["classes"]), activation="softmax"),
    ])
    model_dir = export_model(model, tmp_path / "m", manifest=man, classes=man["classes"])
    out = "file://" + str(tmp_path / "scored")
    summary = score.run(spark, cfg, data_uri=ingested_sample, model_uri=model_dir, output_uri=out, split="test",
                        mode="error")
    rows = read_images(ingested_sample, "test")
    assert summary["rows"] == summary["rows_in"] == len(rows) == man["splits"]["test"] > 0
    got = predictions(spark, out).set_index("image_id").loc[list(rows["image_id"])]
    expected = model.predict(reference_inputs(rows, man), verbose=0)
    np.testing.assert_allclose(got["probability"].to_numpy(), expected.max(axis=1), rtol=1e-4, atol=1e-5)
    assert list(got["label"]) == list(rows["label"])
    saved = json.loads((version_dir(out) / "_metrics.json").read_text())
    assert saved["rows"] == len(rows)
    assert saved["classes"] == sorted(man["classes"], key=man["classes"].get)


def test_cli_rejects_bad_arguments_in_one_line_before_spark_starts(tmp_path, repo_root):
    base = [sys.executable, "-m", "pipeline", "score", "--data", str(tmp_path / "d"), "--model", str(tmp_path / "m"),
            "--output", str(tmp_path / "o")]
    for extra, needle in ((["--split", "bogus"], "--split must be one of"),
                          (["--set", "score.top_k=0"], "'score.top_k'"),
                          (["--set", "score.partition_by=image_id"], "'score.partition_by'"),
                          (["--mode", "resume"], "invalid choice: 'resume'")):
        res = subprocess.run(base + extra, capture_output=True, text=True, cwd=repo_root, timeout=120)
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_spark_submit_job_scores_and_prints_summary(data, model_dir, tmp_path, repo_root):
    out = tmp_path / "submitted"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    res = subprocess.run(
        ["spark-submit", "--master", "local[2]", str(repo_root / "jobs" / "score.py"), "--data", data,
         "--model", model_dir, "--output", str(out), "--split", "test", "--config", "local.yaml",
         "--set", "spark.ui_enabled=false", "--set", "score.partition_by=pred_label"],
        capture_output=True, text=True, cwd=repo_root, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["rows"], summary["rows_in"], summary["rejected"]) == (SPLIT_SIZES["test"],) * 2 + (0,)
    assert (version_dir(out) / "_metrics.json").exists() and summary["version"] == 1
    assert {p.name.split("=")[0] for p in (version_dir(out) / "predictions").iterdir() if p.is_dir()} == {"pred_label"}


def test_one_large_file_is_split_by_row_group_over_every_task_slot_without_a_shuffle(spark, cfg, keras_model,
                                                                                     manifest, tmp_path):
    """Few big files must not leave a core idle, and image bytes must not be shuffled to get there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import score
    from pipeline.spark import task_slots

    rng = np.random.default_rng(3)
    n = 1200  # noise PNGs of ~850 bytes: one ~1 MB file, several times spark.sql.files.openCostInBytes
    blobs = [_encoded(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]
    root = tmp_path / "big"
    (root / "images" / "split=test").mkdir(parents=True)
    table = pa.table({
        "image_id": [hashlib.sha256(b + i.to_bytes(4, "big")).hexdigest() for i, b in enumerate(blobs)],
        "source_path": [f"file:///raw/{i}.png" for i in range(n)],
        "label": [CLASSES[i % 3] for i in range(n)],
        "label_index": pa.array([i % 3 for i in range(n)], pa.int32()),
        "height": pa.array([SIZE] * n, pa.int32()), "width": pa.array([SIZE] * n, pa.int32()),
        "channels": pa.array([3] * n, pa.int32()), "format": ["png"] * n, "image": pa.array(blobs, pa.binary()),
    })
    pq.write_table(table, root / "images" / "split=test" / "part-00000.parquet", row_group_size=100)
    (root / "_manifest.json").write_text(json.dumps({**manifest, "splits": {"test": n}}))
    (root / COMMIT_MARKER).write_text("{}")
    model_dir = export_model(keras_model, tmp_path / "m", manifest=manifest,
                             classes={c: i for i, c in enumerate(CLASSES)})
    summary = score.run(spark, cfg, data_uri="file://" + str(root), model_uri=model_dir,
                        output_uri="file://" + str(tmp_path / "scored"), split="test", mode="error")
    assert (summary["rows"], summary["rows_in"], summary["rejected"]) == (n, n, 0)
    # Split along row groups into ~tasks_per_slot tasks per slot; the shuffle fallback would give exactly `slots`.
    assert task_slots(spark) < summary["tasks"] <= n // 100
    got = predictions(spark, "file://" + str(tmp_path / "scored"))
    assert sorted(got["image_id"]) == sorted(table.column("image_id").to_pylist())


def test_temporary_confs_restore_what_was_there_even_on_error(spark):
    # score sets its Arrow batch size and task count for one run only: a later job in the same
    # session (the next stage in a notebook or a DAG task) must see the session's own values.
    from pipeline.spark import temporary_confs

    set_key, unset_key = "spark.sql.execution.arrow.maxRecordsPerBatch", "spark.sql.files.minPartitionNum"
    before = {k: spark.conf.get(k, None) for k in (set_key, unset_key)}
    spark.conf.set(set_key, "777")
    spark.conf.unset(unset_key)
    try:
        with pytest.raises(RuntimeError):
            with temporary_confs(spark, {set_key: "5", unset_key: "9"}):
                assert spark.conf.get(set_key) == "5" and spark.conf.get(unset_key) == "9"
                raise RuntimeError("the job failed")
        assert spark.conf.get(set_key) == "777"
        assert spark.conf.get(unset_key, None) is None
    finally:  # leave the shared session as the fixture built it
        restore = {k: v for k, v in before.items() if v is not None}
        for k in before.keys() - restore.keys():
            spark.conf.unset(k)
        for k, v in restore.items():
            spark.conf.set(k, v)


def _score_killed_at_commit(data: str, model_dir: str, out: str, *, split: str, mode: str, step: int) -> None:
    """``pixelmill score`` in its own process group, SIGKILLed at commit step ``step`` (with its group)."""
    import contextlib
    import signal

    cmd = [sys.executable, "-m", "pipeline", "score", "--data", data, "--model", model_dir, "--output", out,
           "--split", split, "--mode", mode, "--config", "local.yaml", "--log-level", "WARNING",
           "--set", "spark.ui_enabled=false", "--set", "score.batch_size=16", "--set", f"score.top_k={TOP_K}"]
    env = {**os.environ, "PIXELMILL_FAULT_INJECT": f"commit:kill:step={step}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    _, err = proc.communicate(timeout=540)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("step", [1, 2])
def test_a_driver_killed_at_each_commit_step_leaves_the_old_predictions_or_the_new(spark, cfg, data, model_dir,
                                                                                  tmp_path, step):
    """A SIGKILLed scoring driver (its whole process group) before / after the snapshot create: the
    output reads as the complete old predictions or the complete new ones, and the next run succeeds."""
    from pipeline import score
    from pipeline.commit import committed
    from pipeline.fs import filesystem

    out = "file://" + str(tmp_path / "scored")
    old = score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="test", mode="error")
    _score_killed_at_commit(data, model_dir, out, split="all", mode="overwrite", step=step)
    found = committed(filesystem(out), out)
    expect = SPLIT_SIZES["test"] if step == 1 else sum(SPLIT_SIZES.values())
    assert found.info["split"] == ("test" if step == 1 else "all") and found.info["rows"] == expect
    pdf = predictions(spark, out)
    assert len(pdf) == pdf["image_id"].nunique() == expect == sum(f.rows for f in found.files)
    metrics = json.loads((version_dir(out) / "_metrics.json").read_text())
    assert metrics["rows"] == expect
    assert (found.version == old["version"]) == (step == 1)

    again = score.run(spark, cfg, data_uri=data, model_uri=model_dir, output_uri=out, split="all", mode="overwrite")
    assert again["rows"] == len(predictions(spark, out)) == sum(SPLIT_SIZES.values())


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("step", [1, 2])
def test_a_driver_killed_mid_append_leaves_the_old_predictions_or_the_new(spark, cfg, model_dir, tmp_path, step):
    """``score --mode append`` SIGKILLed before / after its snapshot create: the output reads as the
    old 9 predictions or all 15 (never a mix), and the next append completes it."""
    from pipeline import score
    from pipeline.commit import committed
    from pipeline.fs import filesystem

    small = write_ingest_output(spark, tmp_path / "d1", split_sizes={"test": 9}, seed=3)
    grown = write_ingest_output(spark, tmp_path / "d2", split_sizes={"test": 15}, seed=3)
    out = "file://" + str(tmp_path / "scored")
    old = score.run(spark, cfg, data_uri=small, model_uri=model_dir, output_uri=out, split="test", mode="error")
    _score_killed_at_commit(grown, model_dir, out, split="test", mode="append", step=step)
    found = committed(filesystem(out), out)
    expect = 9 if step == 1 else 15
    assert (found.version == old["version"]) == (step == 1)
    pdf = score.read_predictions(spark, out).toPandas()
    assert len(pdf) == pdf["image_id"].nunique() == expect == found.info["rows"]
    assert sum(f.rows for f in found.files if f.kind == "predictions") == expect
    assert json.loads((version_dir(out) / "_metrics.json").read_text())["rows"] == expect

    again = score.run(spark, cfg, data_uri=grown, model_uri=model_dir, output_uri=out, split="test", mode="append")
    assert again["written"]["predictions"] == 15 - expect
    assert score.read_predictions(spark, out).count() == again["rows"] == 15

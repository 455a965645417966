"""Evaluation metrics: Spark aggregation of (label, pred) counts, checked against numbers worked out by hand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.score import metrics

SCHEMA = "label string, pred_label string"
CLASSES = ["cat", "dog", "fox"]
# (label, pred) -> rows. Matrix (rows true, columns predicted): cat [3 1 0], dog [1 2 0], fox [0 2 0].
PAIRS = {("cat", "cat"): 3, ("cat", "dog"): 1, ("dog", "dog"): 2, ("dog", "cat"): 1, ("fox", "dog"): 2,
         (None, "cat"): 2}

# Worked out by hand: cat P=3/4 R=3/4; dog P=2/5 R=2/3 F1=1/2; fox never predicted -> P=R=F1=0.
EXPECTED = {
    "rows": 9,
    "accuracy": 5 / 9,
    "per_class": {
        "cat": {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4},
        "dog": {"precision": 0.4, "recall": 2 / 3, "f1": 0.5, "support": 3},
        "fox": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2},
    },
    "macro_precision": (0.75 + 0.4) / 3,
    "macro_recall": (0.75 + 2 / 3) / 3,
    "macro_f1": 1.25 / 3,
    "weighted_f1": (0.75 * 4 + 0.5 * 3) / 9,
    "classes": CLASSES,
    "confusion_matrix": [[3, 1, 0], [1, 2, 0], [0, 2, 0]],
    "unlabeled_rows": 2,
}


def assert_close(got, expected, path="metrics"):
    """Recursive equality: exact for ints, strings and keys; floats within 1e-12."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(expected), f"{path}: keys {sorted(got)}"
        for k in expected:
            assert_close(got[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), f"{path}: {got!r}"
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), f"{path}: {got!r} != {expected!r}"
    else:
        assert got == expected and type(got) is type(expected), f"{path}: {got!r} != {expected!r}"


def _frame(spark, pairs):
    rows = [pair for pair, n in pairs.items() for _ in range(n)]
    return spark.createDataFrame(rows, SCHEMA).repartition(3)


def test_spark_evaluation_equals_hand_computed_metrics(spark):
    assert_close(metrics.evaluate(_frame(spark, PAIRS), CLASSES), EXPECTED)


def test_matrix_follows_the_model_class_order_not_alphabetical(spark):
    got = metrics.evaluate(_frame(spark, PAIRS), ["fox", "dog", "cat"])
    assert got["classes"] == ["fox", "dog", "cat"]
    assert got["confusion_matrix"] == [[0, 2, 0], [0, 2, 1], [0, 1, 3]]
    assert got["accuracy"] == pytest.approx(5 / 9)


def test_a_label_the_model_does_not_know_is_appended_and_counted_wrong(spark):
    got = metrics.evaluate(_frame(spark, {("cat", "cat"): 2, ("wolf", "cat"): 1}), ["cat", "dog"])
    assert got["classes"] == ["cat", "dog", "wolf"]
    assert got["confusion_matrix"] == [[2, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["per_class"]["cat"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})


def test_no_labels_means_no_metrics(spark):
    assert metrics.evaluate(_frame(spark, {(None, "cat"): 3, (None, "dog"): 1}), CLASSES) is None


def test_pure_function_matches_spark_path():
    got = metrics.metrics_from_confusion(CLASSES, EXPECTED["confusion_matrix"])
    assert_close(got, {k: v for k, v in EXPECTED.items() if k != "unlabeled_rows"})


def test_write_metrics_puts_json_and_a_readable_png_at_the_uri(spark, tmp_path):
    from PIL import Image

    m = metrics.metrics_from_confusion(CLASSES, EXPECTED["confusion_matrix"])
    metrics.write_metrics(spark, m, "file://" + str(tmp_path), title="unit test")
    saved = json.loads(Path(tmp_path, metrics.METRICS_FILE).read_text())
    assert_close(saved, {"version": metrics.METRICS_VERSION, **m})
    with Image.open(tmp_path / metrics.CONFUSION_PNG) as im:
        im.load()
        assert im.format == "PNG"
        assert im.size[0] >= 200 and im.size[1] >= 200
        # Not a blank canvas: the heat map uses more than a couple of colours.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 10

"""Classification metrics computed with Spark aggregations, plus a confusion-matrix plot.

Only the ``k x k`` confusion counts ever reach the driver (one ``groupBy`` of
``label, pred_label``); accuracy and per-class precision / recall / F1 are
derived from those counts, so the cost on the driver does not grow with the
number of predictions.

Conventions (the same as scikit-learn's with ``zero_division=0``):

* rows are true labels, columns predicted labels, both in the model's class
  order (index from ``model.json``); a label in the data that the model does not
  know is appended after the model's classes;
* a class that is never predicted has precision 0; a class with no true rows has
  recall 0; F1 is 0 when precision + recall is 0;
* rows whose label is null are not evaluated (``unlabeled_rows`` counts them).
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pipeline.contracts import CONFUSION_PNG, METRICS_FILE, METRICS_VERSION
from pipeline.fs import filesystem, join

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["CONFUSION_PNG", "METRICS_FILE", "METRICS_VERSION", "confusion_counts", "confusion_matrix",
           "metrics_from_confusion", "evaluate", "evaluate_counts", "plot_confusion_matrix", "write_metrics"]

log = logging.getLogger(__name__)


def confusion_counts(df: "DataFrame", *, label_col: str = "label", pred_col: str = "pred_label") -> Tuple[Dict[Tuple[str, str], int], int]:
    """``{(label, pred): count}`` over labelled rows, and the number of unlabeled rows.

    One Spark aggregation; the result has at most ``k x k + k`` rows.
    """
    from pyspark.sql import functions as F

    rows = df.groupBy(F.col(label_col).alias("l"), F.col(pred_col).alias("p")).count().collect()
    counts: Dict[Tuple[str, str], int] = {}
    unlabeled = 0
    for r in rows:
        if r["l"] is None:
            unlabeled += int(r["count"])
        else:
            counts[(str(r["l"]), str(r["p"]))] = int(r["count"])
    return counts, unlabeled


def confusion_matrix(counts: Mapping[Tuple[str, str], int], classes: Sequence[str]) -> Tuple[List[str], List[List[int]]]:
    """A dense matrix (rows true, columns predicted) over ``classes`` plus any unseen label."""
    names = list(classes)
    extra = sorted({n for pair in counts for n in pair} - set(names))
    if extra:
        log.warning("labels not among the model's classes appear in the data: %s", ", ".join(extra))
    names += extra
    pos = {n: i for i, n in enumerate(names)}
    m = [[0] * len(names) for _ in names]
    for (label, pred), n in counts.items():
        m[pos[label]][pos[pred]] += n
    return names, m


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def metrics_from_confusion(classes: Sequence[str], matrix: Sequence[Sequence[int]]) -> Dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 / support and macro / weighted averages."""
    k = len(classes)
    total = sum(sum(row) for row in matrix)
    correct = sum(matrix[i][i] for i in range(k))
    per_class: Dict[str, Dict[str, float]] = {}
    for i, name in enumerate(classes):
        tp = matrix[i][i]
        predicted = sum(matrix[r][i] for r in range(k))
        support = sum(matrix[i])
        p = _ratio(tp, predicted)
        r = _ratio(tp, support)
        f1 = _ratio(2 * p * r, p + r)
        per_class[name] = {"precision": p, "recall": r, "f1": f1, "support": int(support)}
    supports = [per_class[c]["support"] for c in classes]

    def macro(key: str) -> float:
        return _ratio(sum(per_class[c][key] for c in classes), k)

    def weighted(key: str) -> float:
        return _ratio(sum(per_class[c][key] * s for c, s in zip(classes, supports)), total)

    return {
        "rows": int(total),
        "accuracy": _ratio(correct, total),
        "per_class": per_class,
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "weighted_f1": weighted("f1"),
        "classes": list(classes),
        "confusion_matrix": [list(map(int, row)) for row in matrix],
    }


def evaluate(df: "DataFrame", classes: Sequence[str], *, label_col: str = "label", pred_col: str = "pred_label") -> Optional[Dict[str, Any]]:
    """Metrics of ``df``'s predictions, or None when no row has a label.

    Parameters
    ----------
    df:
        Predictions with a (nullable) label column and a predicted-label column.
    classes:
        Class names in the model's index order (fixes the matrix order).
    """
    counts, unlabeled = confusion_counts(df, label_col=label_col, pred_col=pred_col)
    return evaluate_counts(counts, unlabeled, classes)


def evaluate_counts(counts: Mapping[Tuple[str, str], int], unlabeled: int,
                    classes: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Metrics from :func:`confusion_counts`' result, or None when no row has a label."""
    if not counts:
        return None
    names, matrix = confusion_matrix(counts, classes)
    out = metrics_from_confusion(names, matrix)
    out["unlabeled_rows"] = unlabeled
    return out


def plot_confusion_matrix(classes: Sequence[str], matrix: Sequence[Sequence[int]], path: str, *, title: str = "") -> None:
    """Write a PNG heat map of ``matrix`` (counts annotated when it is small) to local ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    m = np.asarray(matrix, dtype=np.int64).reshape(len(classes), len(classes))
    k = len(classes)
    side = min(4 + 0.45 * k, 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=100)
    try:
        im = ax.imshow(m, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(classes, fontsize=8)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_title(title or f"confusion matrix ({int(m.sum())} images)")
        if k <= 30:
            threshold = m.max() / 2 if m.size and m.max() else 0
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if m[i, j] > threshold else "black")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def write_metrics(spark: Optional["SparkSession"], metrics: Mapping[str, Any], out_uri: str, *,
                  title: str = "") -> None:
    """Write ``<out_uri>/_metrics.json`` and ``<out_uri>/confusion_matrix.png``."""
    fs = filesystem(out_uri, spark)
    fs.write_json(join(out_uri, METRICS_FILE), {"version": METRICS_VERSION, **metrics})
    with tempfile.TemporaryDirectory(prefix="pixelmill-cm-") as tmp:
        png = os.path.join(tmp, CONFUSION_PNG)
        plot_confusion_matrix(metrics["classes"], metrics["confusion_matrix"], png, title=title)
        fs.upload(png, join(out_uri, CONFUSION_PNG))

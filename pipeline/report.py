"""A one-page HTML report of a pipeline run that a person can read in a minute.

Built from what the stages committed (ingest manifest, model.json, history.csv,
training_curves.png, _metrics.json, confusion_matrix.png), read through the
contracts' readers and :mod:`pipeline.fs`; it recomputes nothing that a stage
already measured.
"""
from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

from pipeline.contracts import (
    CONFUSION_PNG, CURVES_PNG, HISTORY_CSV, METRICS_FILE, read_manifest, read_model_card, resolve_ingest,
    resolve_scores,
)
from pipeline.fs import FileSystem, filesystem, join, to_uri
from pipeline.quality_report import IMAGES_CHECK, read_examples, section as quality_section


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(headers: List[str], rows: List[List[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def class_balance_png(manifest: Mapping[str, Any], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = manifest.get("class_counts") or {}
    if not counts:
        return None
    labels = sorted(counts, key=lambda k: manifest.get("classes", {}).get(k, 0))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(labels)), [counts[k] for k in labels], color="#4477aa")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.set_title("Accepted images per class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PER_CLASS_HEADERS = ["class", "train images", "train share", "loss weight", "precision", "recall", "F1", "support"]


def per_class_rows(metrics: Mapping[str, Any], balance: Optional[Mapping[str, Any]] = None) -> List[List[Any]]:
    """Per class: the train split's count and share, its loss weight (``train.class_weight``), then the test metrics.

    ``balance`` is the model card's ``class_balance`` (None for a model trained before it was recorded).
    """
    per = metrics.get("per_class") or {}
    order = list(metrics.get("classes") or sorted(per))
    counts = (balance or {}).get("train_counts") or {}
    weights = (balance or {}).get("weights") or {}
    total = sum(counts.values())
    return [[label, counts.get(label), (counts[label] / total) if total and label in counts else None,
             weights.get(label, 1.0 if balance else None), per[label].get("precision"), per[label].get("recall"),
             per[label].get("f1"), per[label].get("support")] for label in order if label in per]


def summary_table(manifest: Mapping[str, Any], model_meta: Mapping[str, Any], metrics: Mapping[str, Any],
                  stages: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text summary for the terminal."""
    lines = [
        f"{'stage':<8} {'seconds':>8} {'images':>8} {'images/s':>9}  notes",
        "-" * 64,
    ]
    for name, s in stages.items():
        note = ""
        if name == "ingest":
            note = f"accepted {s.get('accepted')}, rejected {s.get('rejected')}"
        elif name == "train":
            note = f"epochs {s.get('epochs')}, val_accuracy {_fmt(s.get('val_accuracy'))}"
        elif name == "score":
            note = f"test accuracy {_fmt(s.get('accuracy'))}"
        lines.append(f"{name:<8} {_fmt(s.get('seconds'), 1):>8} {_fmt(s.get('images')):>8} "
                     f"{_fmt(s.get('images_per_second'), 0):>9}  {note}")
    lines.append("-" * 64)
    lines.append(f"splits {manifest.get('splits')}  rejects {manifest.get('rejected')}")
    lines.append(f"test accuracy {_fmt(metrics.get('accuracy'))} on {_fmt(metrics.get('rows'))} images; "
                 f"model {model_meta.get('model_id')}")
    return "\n".join(lines)


def _history(fs: FileSystem, uri: str) -> Tuple[List[str], List[List[Any]]]:
    """``(columns, rows)`` of the training's history.csv, or nothing when it has none."""
    if not fs.exists(uri):
        return [], []
    reader = csv.DictReader(io.StringIO(fs.read_text(uri)))
    cols = list(reader.fieldnames or [])
    return cols, [[r.get(c) for c in cols] for r in reader]


def write_report(out_dir: Path, *, ingest_dir: Path, model_dir: Path, score_dir: Path,
                 stages: Mapping[str, Mapping[str, Any]], wall_seconds: float) -> Path:
    """Write ``out_dir/index.html`` (+ PNGs next to it); returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_uri = to_uri(str(model_dir))
    score_uri = resolve_scores(to_uri(str(score_dir))).root  # the version folders these stages committed
    ingest_root = resolve_ingest(to_uri(str(ingest_dir))).root
    model_fs, score_fs = filesystem(model_uri), filesystem(score_uri)
    manifest = read_manifest(ingest_root)
    model_meta = read_model_card(model_fs, model_uri)
    metrics = score_fs.read_json(join(score_uri, METRICS_FILE))

    images = {}
    for fs, src, name in ((model_fs, model_uri, CURVES_PNG), (score_fs, score_uri, CONFUSION_PNG)):
        if fs.exists(join(src, name)):
            fs.download(join(src, name), str(out_dir / name))
            images[name] = name
    if class_balance_png(manifest, out_dir / "class_balance.png"):
        images["class_balance.png"] = "class_balance.png"
    cols, history_rows = _history(model_fs, join(model_uri, HISTORY_CSV))

    acc = metrics.get("accuracy")
    rejected = manifest.get("rejected") or {}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>pixelmill run report</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f2f2f2}td:first-child{text-align:left}.big{font-size:2.2em;font-weight:600}"
        "img{max-width:100%;border:1px solid #ddd;margin:.4em 0}.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}"
        ".thumbs{display:flex;flex-wrap:wrap;gap:.5em}.thumbs figure{margin:0;font-size:.75em;max-width:120px}"
        ".pair{border-left:3px solid #cc6677;padding-left:.4em;margin:.3em 0}",
        "</style></head><body>",
        "<h1>pixelmill run report</h1>",
        f"<p class='big'>test accuracy {html.escape(_fmt(acc))}</p>",
        f"<p>{_fmt(manifest.get('files_seen'))} files in, {_fmt(manifest.get('accepted'))} accepted, "
        f"{_fmt(sum(rejected.values()))} rejected; model <code>{html.escape(str(model_meta.get('model_id')))}</code> "
        f"trained {_fmt(model_meta.get('epochs_completed'))} epochs; whole run {wall_seconds:.0f} s.</p>",
        "<h2>Stages</h2>",
        _table(["stage", "seconds", "images", "images/s"],
               [[k, _fmt(v.get("seconds"), 1), v.get("images"), _fmt(v.get("images_per_second"), 0)] for k, v in stages.items()]),
        "<h2>Data</h2>",
        _table(["split", "images"], [[k, v] for k, v in (manifest.get("splits") or {}).items()]),
        _table(["reject reason", "files"], [[k, v] for k, v in rejected.items()] or [["(none)", 0]]),
    ]
    if "class_balance.png" in images:
        parts.append("<img src='class_balance.png' alt='class balance'>")
    parts.append(quality_section(manifest, read_examples(ingest_root), out_dir))
    parts.append("<h2>Training</h2>")
    if CURVES_PNG in images:
        parts.append(f"<img src='{CURVES_PNG}' alt='training curves'>")
    if history_rows:
        parts.append(_table(cols, history_rows))
    parts.append("<h2>Test set</h2><div class='grid'><div>")
    parts.append(_table(PER_CLASS_HEADERS, per_class_rows(metrics, model_meta.get("class_balance"))))
    parts.append("</div><div>")
    if CONFUSION_PNG in images:
        parts.append(f"<img src='{CONFUSION_PNG}' alt='confusion matrix'>")
    parts.append("</div></div>")
    provenance = {"stack": model_meta.get("stack"), "ingest_manifest_sha256": model_meta.get("ingest_manifest_sha256"),
                  "input": manifest.get("input_uri")}
    parts.append(f"<h2>Provenance</h2><pre>{html.escape(json.dumps(provenance, indent=2))}</pre>")
    parts.append(IMAGES_CHECK + "</body></html>")
    path = out_dir / "index.html"
    path.write_text("\n".join(parts))
    return path

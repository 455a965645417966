"""``pixelmill run``: ingest -> train -> score -> report on one SparkSession.

For local and single-cluster use: one command, one output root, every stage's
output in the layout of :class:`Layout` (``<root>/ingest``, ``model``, ``scores``,
``report``). A rerun continues where the last one stopped:

* ingest: a committed output of the same input is reused;
* train: ``--mode resume`` (a finished run is skipped by the train stage itself,
  a crashed one resumes from its last checkpoint); after a new ingest it starts
  over, since checkpoints of other data cannot be resumed;
* score: a committed output of the same data, split and ``model_id`` is reused
  (redone after a new ingest);
* the report is always rewritten (it only reads what the stages committed).

``fresh=True`` (``--fresh``) redoes every stage. Each stage logs one progress
line (what happened, seconds, its key figure); :func:`run` returns the summary
the CLI prints as its last stdout line.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple

from pydantic import ValidationError

from pipeline.config import Config, format_validation_error
from pipeline.commit import committed, is_committed
from pipeline.contracts import (
    METRICS_FILE, IngestManifest, ModelCard, read_manifest, read_model_card, resolve_ingest, resolve_scores,
)
from pipeline.errors import ConfigError, OutputExistsError
from pipeline.fs import filesystem, join, local_path, to_uri

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: What happened to a stage, as the summary's ``stages.<name>.action`` says.
RAN, REUSED, RESUMED, SKIPPED = "ran", "reused", "resumed", "skipped"
#: The file :func:`pipeline.report.write_report` writes into the report folder.
REPORT_PAGE = "index.html"

#: ``(manifest, config) -> {train key: value}``: train settings chosen once the data is known.
TrainOverrides = Callable[[IngestManifest, Config], Mapping[str, Any]]


@dataclass(frozen=True)
class Layout:
    """Where each stage's output goes under one output root."""

    root: str
    ingest: str
    model: str
    scores: str
    report: str

    @classmethod
    def under(cls, output_root: str) -> "Layout":
        root = to_uri(output_root)
        return cls(root=root, ingest=join(root, "ingest"), model=join(root, "model"),
                   scores=join(root, "scores"), report=join(root, "report"))


def run(spark: "SparkSession", cfg: Config, *, input_uri: str, output_root: str, split: str = "test",
        fresh: bool = False, num_proc: Optional[int] = None, epochs: Optional[int] = None,
        earlier_stages: Optional[Mapping[str, Mapping[str, Any]]] = None,
        train_overrides: Optional[TrainOverrides] = None) -> Dict[str, Any]:
    """Run ingest, train, score and the report on ``spark``; returns the run's summary.

    Parameters
    ----------
    input_uri:
        Raw images, as ``pixelmill ingest --input`` takes them.
    output_root:
        Everything goes under it (see :class:`Layout`).
    split:
        The split to score (and report on); ``test`` by default.
    fresh:
        Redo every stage instead of reusing or resuming what is there.
    num_proc, epochs:
        Shorthands for ``train.num_proc`` / ``train.epochs``.
    earlier_stages:
        Figures of work done before the chain (the demo's data export): listed first in the
        summary and the report, their seconds counted in ``wall_seconds``.
    train_overrides:
        Called with the ingest manifest before training; the train settings it returns are
        applied (the demo shrinks the batch of a quick look).

    Returns ``stages`` (per stage: ``action`` ran/reused/resumed/skipped, ``seconds`` and its
    figures), ``accuracy`` of the scored split (None when it has no labels), ``train_rows``,
    ``model_id``, ``wall_seconds`` and ``report`` (the page's path, None without metrics).
    """
    from pipeline.spark import assert_on_driver

    assert_on_driver()
    t0 = time.time()
    cfg = with_train(cfg, num_proc=num_proc, epochs=epochs)
    out = Layout.under(output_root)
    stages: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in (earlier_stages or {}).items()}
    earlier_s = sum(float(v.get("seconds") or 0) for v in stages.values())

    manifest, stages["ingest"] = ingest_step(spark, cfg, input_uri=to_uri(input_uri), out=out, fresh=fresh)
    if train_overrides is not None:
        cfg = with_train(cfg, **train_overrides(manifest, cfg))
    # A model and its scores hold only for the ingest they were made from: after a new ingest, redo them.
    redo = fresh or stages["ingest"]["action"] == RAN
    card, stages["train"] = train_step(spark, cfg, out=out, fresh=redo)
    metrics, stages["score"] = score_step(spark, cfg, out=out, card=card, split=split, fresh=redo)
    report = report_step(out, stages, wall_seconds=round(earlier_s + time.time() - t0, 1),
                         has_metrics=metrics is not None)
    return {"stage": "run", "output_root": out.root, "split": split, "stages": stages,
            "accuracy": None if metrics is None else metrics.get("accuracy"),
            "train_rows": int(manifest.splits.get("train", 0)), "model_id": card.model_id,
            "wall_seconds": round(earlier_s + time.time() - t0, 1), "report": report}


# --- the steps ----------------------------------------------------------------------------

def ingest_step(spark: "SparkSession", cfg: Config, *, input_uri: str, out: Layout,
                fresh: bool) -> Tuple[IngestManifest, Dict[str, Any]]:
    """Ingest ``input_uri`` into ``out.ingest``, or reuse a committed ingest of the same input."""
    from pipeline import ingest

    t = time.time()
    fs = filesystem(out.ingest, spark)
    action = REUSED if not fresh and is_committed(fs, out.ingest) else RAN
    if action == RAN:
        ingest.run(spark, cfg, input_uri=input_uri, output_uri=out.ingest, mode="overwrite")
    manifest = read_manifest(out.ingest, fs)
    if action == REUSED:
        _check_same_input(manifest, input_uri, out.ingest)
    rejected = sum(manifest.rejected.values())
    figures = {"action": action, "seconds": _since(t), "images": manifest.files_seen, "accepted": manifest.accepted,
               "rejected": rejected, "images_per_second": manifest.get("images_per_second")}
    log.info("ingest: %s %s (%.1f s; %d accepted, %d rejected)", action, out.ingest, figures["seconds"],
             manifest.accepted, rejected)
    return manifest, figures


def train_step(spark: "SparkSession", cfg: Config, *, out: Layout, fresh: bool) -> Tuple[ModelCard, Dict[str, Any]]:
    """Train into ``out.model`` with ``--mode resume`` (``overwrite`` when ``fresh``)."""
    from pipeline import train

    t = time.time()
    summary = train.run(spark, cfg, data_uri=out.ingest, model_dir=out.model,
                        mode="overwrite" if fresh else "resume")
    card = read_model_card(filesystem(out.model, spark), out.model)
    action = SKIPPED if summary.get("skipped") else RESUMED if summary.get("resumed_from") else RAN
    figures = {"action": action, "seconds": _since(t), "epochs": card.epochs_completed,
               "epochs_run_now": int(summary.get("epochs_run", 0)),
               "images_per_second": summary.get("images_per_second"),
               "val_accuracy": card.metrics.get("val_accuracy"), "model_id": card.model_id}
    log.info("train: %s %s (%.1f s; %s epochs, %d this run, val_accuracy %s)", action, out.model,
             figures["seconds"], card.epochs_completed, figures["epochs_run_now"], _fmt(figures["val_accuracy"]))
    return card, figures


def score_step(spark: "SparkSession", cfg: Config, *, out: Layout, card: ModelCard, split: str,
               fresh: bool) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
    """Score ``split`` into ``out.scores``, or reuse a committed scoring by the same model."""
    from pipeline import score

    t = time.time()
    fs = filesystem(out.scores, spark)
    done = None if fresh else _committed_scoring(fs, out, model_id=card.model_id, split=split)
    action = REUSED if done is not None else RAN
    if done is None:
        done = score.run(spark, cfg, data_uri=out.ingest, model_uri=out.model, output_uri=out.scores, split=split,
                         mode="overwrite")
    metrics_uri = join(resolve_scores(out.scores, fs).root, METRICS_FILE)
    metrics = fs.read_json(metrics_uri) if fs.exists(metrics_uri) else None
    accuracy = None if metrics is None else metrics.get("accuracy")
    figures = {"action": action, "seconds": _since(t), "images": done.get("rows"),
               "images_per_second": done.get("images_per_second"), "accuracy": accuracy,
               "model_id": done.get("model_id")}
    log.info("score: %s %s (%.1f s; %s %s rows, accuracy %s)", action, out.scores, figures["seconds"],
             figures["images"], split, _fmt(accuracy))
    return metrics, figures


def report_step(out: Layout, stages: Mapping[str, Mapping[str, Any]], *, wall_seconds: float,
                has_metrics: bool) -> Optional[str]:
    """Rewrite ``out.report``/index.html; returns its path (a URI off the local disk), None without metrics."""
    from pipeline import report

    if not has_metrics:
        log.info("report: skipped (the scored split has no labels, so no metrics to show)")
        return None
    t = time.time()
    here = local_path(out.report)
    if here is not None:
        page = str(report.write_report(here, ingest_dir=out.ingest, model_dir=out.model, score_dir=out.scores,
                                       stages=stages, wall_seconds=wall_seconds))
    else:  # the report is written on the local disk, then copied next to the other outputs
        with tempfile.TemporaryDirectory(prefix="pixelmill-report-") as tmp:
            report.write_report(tmp, ingest_dir=out.ingest, model_dir=out.model, score_dir=out.scores,
                                stages=stages, wall_seconds=wall_seconds)
            filesystem(out.report).upload_tree(tmp, out.report)
        page = join(out.report, REPORT_PAGE)
    log.info("report: wrote %s (%.1f s; whole run %.0f s)", page, _since(t), wall_seconds)
    return page


def summary_table(out: Layout, stages: Mapping[str, Mapping[str, Any]]) -> str:
    """The terminal table of :func:`pipeline.report.summary_table` for a run under ``out``."""
    from pipeline import report

    fs = filesystem(out.scores)
    metrics_uri = join(resolve_scores(out.scores, fs).root, METRICS_FILE)
    metrics = fs.read_json(metrics_uri) if fs.exists(metrics_uri) else {}
    return report.summary_table(read_manifest(out.ingest), read_model_card(filesystem(out.model), out.model),
                                metrics, stages)


# --- helpers --------------------------------------------------------------------------------

def with_train(cfg: Config, **values: Any) -> Config:
    """``cfg`` with the ``train`` keys in ``values`` set (None leaves a key as it is), validated."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return cfg
    data = cfg.model_dump()
    data["train"].update(given)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _check_same_input(manifest: IngestManifest, input_uri: str, ingest_uri: str) -> None:
    """Refuse to reuse an ingest output made from another input."""
    inputs = manifest.get("input_uris") or [manifest.input_uri]
    if input_uri not in inputs:
        raise OutputExistsError(f"{ingest_uri} holds an ingest of {', '.join(map(str, inputs))}, not of {input_uri}: "
                                "pass --fresh to re-ingest, or choose another --output-root")


def _committed_scoring(fs: Any, out: Layout, *, model_id: str, split: str) -> Optional[Dict[str, Any]]:
    """The score summary committed at ``out.scores`` when it scored ``split`` of ``out.ingest`` with ``model_id``."""
    found = committed(fs, out.scores)
    if found is None:
        return None
    info = found.info
    same = (info.get("model_id") == model_id and info.get("split") == split
            and info.get("data_uri") == out.ingest
            and info.get("data_version") == resolve_ingest(out.ingest).version)
    if not same:
        log.info("score: %s was made by model %s on split %s: scoring again with model %s", out.scores,
                 info.get("model_id"), info.get("split"), model_id)
    return info if same else None


def _since(t: float) -> float:
    return round(time.time() - t, 1)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

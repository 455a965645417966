"""Distributed batch scoring of an ingest output back to Parquet, with evaluation.

``run(spark, cfg, data_uri=..., model_uri=..., output_uri=..., split=..., mode=...)``

1. Checks everything cheap on the driver before any output is touched
   (:mod:`pipeline.score.driver`, :mod:`pipeline.score.model`): the ingest output is
   committed, the model exists and loads with Keras safe mode, its ``model.json`` agrees
   with the data (image size, channels, class mapping) and with the model itself (input
   shape, number of outputs, ``model_id`` = sha256 of ``model.keras``).
2. Scores with ``mapInArrow`` (:mod:`pipeline.score.worker`): every Python worker loads
   the model once and runs it on batches of ``score.batch_size`` images decoded by
   :func:`pipeline.imaging.stored.decode_images`, whose header check is the
   decompression-bomb guard of this path.
3. Writes ``<out>/predictions/`` (partitioned by ``score.partition_by``) and, when labels
   exist, ``_metrics.json`` + ``confusion_matrix.png`` computed with Spark aggregations
   (:mod:`pipeline.score.metrics`), all inside :func:`pipeline.commit.versioned_output`: a
   failed or killed run leaves nothing at ``<out>``, a rerun never mixes in debris.
   ``--mode append`` scores only the rows without a prediction or reject (by ``image_id``)
   in the committed output, of the same model and split; its version lists the earlier
   versions' prediction folders (:func:`pipeline.contracts.prediction_folders`) and its
   metrics cover them all.

Every input row is accounted for: it is either a prediction or, when its stored bytes
cannot be decoded to the model's image size (corrupt or planted data), a row of
``<out>/rejects/`` (``pipeline.schema.REJECT_FIELDS``); the job checks
``rows_in == predictions + rejected`` before it commits.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from pipeline import tracking
from pipeline.commit import versioned_output
from pipeline.config import Config
from pipeline.contracts import METRICS_FILE, PREDICTIONS_DIR, REJECTS_DIR, prediction_folders
from pipeline.fs import filesystem, join, to_uri
from pipeline.score import driver
from pipeline.score.driver import MODE_CHOICES, SPLIT_CHOICES
from pipeline.score.worker import PREDICTION_COLUMNS, PREDICTION_FIELDS
from pipeline.spark import assert_on_driver, set_job_description

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["run", "read_predictions", "PREDICTION_FIELDS", "PREDICTION_COLUMNS", "SPLIT_CHOICES", "MODE_CHOICES"]

log = logging.getLogger(__name__)


def run(spark: "SparkSession", cfg: Config, *, data_uri: str, model_uri: str, output_uri: str,
        split: str = "test", mode: str = "error", data_version: Optional[int] = None) -> Dict[str, Any]:
    """Score ``split`` of the ingest output ``data_uri`` with a trained model; write ``output_uri``.

    Returns the summary printed by the CLI: ``rows`` (predictions written),
    ``rows_in``, ``rejected``, ``metrics`` (accuracy and macro averages, or None
    when unlabeled), ``model_id``, URIs and timings.
    """
    assert_on_driver()
    t0 = time.time()
    data_uri, model_uri, output_uri = to_uri(data_uri), to_uri(model_uri), to_uri(output_uri)
    driver.check_choices(split, mode)
    inputs = driver.check_inputs(spark, data_uri=data_uri, model_uri=model_uri, output_uri=output_uri, split=split,
                                 data_version=data_version)
    model = inputs.model
    checks_s = time.time() - t0
    prior = (driver.prior_scores(spark, output_uri, model, split=split, partition_by=cfg.score.partition_by)
             if mode == "append" else None)
    todo = inputs.df if prior is None else driver.not_yet_scored(spark, inputs.df, prior)
    rows_in = driver.count_rows(spark, todo, f"{split} rows of {data_uri}" + (" not scored yet" if prior else ""))
    driver.check_output(spark, output_uri, mode)
    plan = driver.make_plan(spark, cfg.score, model, inputs.driver_file)
    summary: Dict[str, Any] = {"stage": "score", "split": split, "model_id": model.model_id,
                               "data_uri": data_uri, "data_version": inputs.data.version,
                               "model_dir": model.model_dir, "output_uri": output_uri,
                               "partition_by": cfg.score.partition_by, "mode": mode}
    # an append's version lists the earlier versions' folders and writes only its new rows
    kept = [f for f in (prior.files if prior else ()) if f.kind in ("predictions", "rejects")]
    kept_rows = {k: sum(f.rows for f in kept if f.kind == k) for k in ("predictions", "rejects")}
    log.info("scoring split %r of %s (%d rows%s) with model %s (%d classes, %s)", split, data_uri, rows_in,
             f"; {kept_rows['predictions']} scored before" if prior else "", model.model_id, len(model.classes),
             "x".join(map(str, model.spec.shape)))
    try:
        with (driver.spread_over_slots(spark, cfg.score, todo) as (df, tasks),
              versioned_output(spark, output_uri, info=summary, retain=cfg.score.retain_versions) as version):
            staging = version.uri
            t_score = time.time()
            undecodable = driver.score_pass(spark, df, plan, join(staging, PREDICTIONS_DIR),
                                            partition_by=cfg.score.partition_by)
            score_s = time.time() - t_score
            t_metrics = time.time()
            counts, unlabeled = driver.count_predictions(spark, join(staging, PREDICTIONS_DIR))
            written = sum(counts.values()) + unlabeled
            rejected = 0
            if undecodable or written != rows_in:
                rejected = driver.rejects_pass(spark, df, plan, join(staging, REJECTS_DIR), output_uri=output_uri)
            driver.check_accounted(rows_in, written, rejected)
            if prior is not None and kept_rows["predictions"]:  # metrics cover every prediction the version lists
                counts, unlabeled = driver.count_predictions(
                    spark, *prediction_folders(prior), join(staging, PREDICTIONS_DIR))
            metrics = driver.write_evaluation(spark, counts, unlabeled, plan, staging, split=split, data_uri=data_uri)
            summary.update(_outcome(staging, plan.scored_at.isoformat(), metrics,
                                    rows=written + kept_rows["predictions"],
                                    rows_in=rows_in + kept_rows["predictions"] + kept_rows["rejects"],
                                    rejected=rejected + kept_rows["rejects"], tasks=tasks))
            summary.update({"version": version.version, "version_root": staging,
                            "written": {"predictions": written, "rejected": rejected, "incremental": prior is not None}})
            for f in kept:
                version.add(join(output_uri, f.path), f.rows, f.kind)
            version.add(join(staging, PREDICTIONS_DIR), written, "predictions")
            if rejected:
                version.add(join(staging, REJECTS_DIR), rejected, "rejects")
            summary["timings"] = {"total_s": round(time.time() - t0, 3), "checks_s": round(checks_s, 3),
                                  "score_s": round(score_s, 3), "metrics_s": round(time.time() - t_metrics, 3)}
            summary["images_per_second"] = round(rows_in / score_s, 1) if score_s > 0 else None
            cores = max(1, int(spark.sparkContext.defaultParallelism))
            summary["images_per_second_per_core"] = (round(rows_in / score_s / cores, 1) if score_s > 0
                                                     else None)
    finally:
        set_job_description(spark, None)  # type: ignore[arg-type]
    tracking.log_scoring(model.card, cfg, filesystem(output_uri, spark), summary["version_root"], split=split,
                         metrics=metrics,
                         summary=summary)
    log.info("scored %d rows (%d rejected) in %.1fs: %s", summary["rows"], summary["rejected"],
             summary["timings"]["total_s"],
             f"accuracy {summary['metrics']['accuracy']:.4f}" if summary["metrics"] else "no labels, no metrics")
    return summary


def read_predictions(spark: "SparkSession", output_uri: str, version: Optional[int] = None) -> "DataFrame":
    """Every prediction of a committed score output (newest version, or ``version``), one row per scored
    image: the union of the folders its snapshot lists (an appended version spans several)."""
    from pipeline.contracts import resolve_scores

    output_uri = to_uri(output_uri)
    scores = resolve_scores(output_uri, filesystem(output_uri, spark), version=version)
    return driver.read_folders(spark, prediction_folders(scores), driver.PREDICTION_DDL)


def _outcome(output_uri: str, scored_at: str, metrics: Optional[Dict[str, Any]], *, rows: int, rows_in: int,
             rejected: int, tasks: int) -> Dict[str, Any]:
    """The summary's counts, URIs and headline metrics."""
    return {
        "rows": rows, "rows_in": rows_in, "rejected": rejected, "tasks": tasks,
        "predictions_uri": join(output_uri, PREDICTIONS_DIR),
        "metrics_uri": join(output_uri, METRICS_FILE) if metrics else None,
        "metrics": None if metrics is None else {
            k: metrics[k] for k in ("rows", "accuracy", "macro_precision", "macro_recall", "macro_f1")},
        "scored_at": scored_at,
    }

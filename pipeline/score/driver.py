"""The driver side of scoring: the checks, the model file on the driver, the plan, the Spark passes.

:func:`pipeline.score.run` calls these in order; each pass is one Spark job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

from pipeline import faults
from pipeline.commit import Committed, check_output_mode
from pipeline.commit import committed as _committed
from pipeline.config import ScoreConfig
from pipeline.contracts import (IngestManifest, prediction_folders, read_manifest, read_split_images,
                                reject_folders, resolve_ingest)
from pipeline.errors import ConfigError, DataError, InvariantError, OutputExistsError
from pipeline.fs import filesystem, is_under, join
from pipeline.schema import REJECT_COLUMNS, REJECT_FIELDS, SPLIT_COLUMN, SPLITS, UNLABELED_SPLIT, ddl
from pipeline.score import metrics as _metrics
from pipeline.score.model import ModelInfo, check_compatible, check_model_file, driver_model_file, read_model_info
from pipeline.score.worker import PREDICTION_COLUMNS, PREDICTION_FIELDS, ScoringPlan, reject_partition
from pipeline.score.worker import score_partition
from pipeline.spark import is_local_master, set_job_description, task_slots, temporary_confs

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

SPLIT_CHOICES = SPLITS + (UNLABELED_SPLIT, "all")
MODE_CHOICES = ("error", "overwrite", "append")
PREDICTION_DDL = ddl(PREDICTION_FIELDS)
REJECT_DDL = ddl(REJECT_FIELDS)
_INPUT_COLUMNS = ("image_id", "source_path", "label", SPLIT_COLUMN, "image")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the checks found: the model, its driver-local file, the ingest manifest and the rows to score."""

    model: ModelInfo
    driver_file: str
    manifest: IngestManifest
    df: "DataFrame"
    data: Committed  #: the data version read (resolved once)


# --- checks: nothing is written before all of these pass ----------------------------------

def check_choices(split: str, mode: str) -> None:
    if split not in SPLIT_CHOICES:
        raise ConfigError(f"--split must be one of {', '.join(SPLIT_CHOICES)} (got {split!r})")
    if mode not in MODE_CHOICES:
        raise ConfigError(f"--mode must be one of {', '.join(MODE_CHOICES)} for score (got {mode!r})")


def check_overlap(data_uri: str, model_dir: str, output_uri: str) -> None:
    """Refuse an output inside (or holding) the data or the model: overwrite would delete them."""
    for flag, other in (("--data", data_uri), ("--model", model_dir)):
        if is_under(output_uri, other) or is_under(other, output_uri):
            raise ConfigError(f"--output {output_uri} overlaps {flag} {other}: write predictions to a separate folder")


def read_split(spark: "SparkSession", data: "Committed", split: str, splits: Mapping[str, int]) -> "DataFrame":
    """The ingest rows of ``split`` (``all`` = every split) of version ``data``, only the columns scoring needs.

    Each split is read from the folders the version's snapshot lists (an appended output
    spans several), with its name as the ``split`` column.
    """
    available = {k: v for k, v in splits.items() if v > 0}
    if split != "all" and split not in available:
        have = ", ".join(f"{k}={v}" for k, v in sorted(available.items())) or "nothing"
        raise DataError(f"split {split!r} of {data.uri} holds no images (it has: {have}): "
                        "pass --split with one of those, or --split all")
    if not available:
        raise DataError(f"{data.uri} holds no images: nothing to score")
    return read_split_images(spark, data, sorted(available) if split == "all" else [split]).select(*_INPUT_COLUMNS)


def check_inputs(spark: "SparkSession", *, data_uri: str, model_uri: str, output_uri: str, split: str,
                 data_version: Optional[int] = None) -> Inputs:
    """Every check that needs no output: model card, overlap, manifest, data vs model, split, model file."""
    model_fs = filesystem(model_uri, spark)
    model = read_model_info(model_fs, model_uri)
    check_overlap(data_uri, model.model_dir, output_uri)
    data = resolve_ingest(data_uri, spark=spark, version=data_version)
    manifest = read_manifest(data.root, spark=spark)
    check_compatible(model, manifest, data_uri)
    df = read_split(spark, data, split, manifest.splits)
    driver_file = driver_model_file(model_fs, model)
    check_model_file(driver_file, model)
    return Inputs(model, driver_file, manifest, df, data)


def check_output(spark: "SparkSession", output_uri: str, mode: str) -> None:
    try:
        check_output_mode(filesystem(output_uri, spark), output_uri, mode)  # type: ignore[arg-type]
    except OutputExistsError:
        raise OutputExistsError(f"output {output_uri} already exists: pass --mode overwrite to replace it, "
                                "or --mode append to score only the rows it has no prediction for") from None


# --- append: score only what the output has no prediction for ---------------------------------

def prior_scores(spark: "SparkSession", output_uri: str, model: ModelInfo, *, split: str,
                 partition_by: Optional[str]) -> Optional[Committed]:
    """On ``--mode append``: the committed score output to extend (None: nothing committed yet).

    Its predictions must come from the same model, split and partitioning: an appended version
    is the union of its folders, and metrics over rows of two models mean nothing.
    """
    prior = _committed(filesystem(output_uri, spark), output_uri)
    if prior is None:
        log.info("--mode append: %s holds no committed scores yet, scoring every row", output_uri)
        return None
    info = prior.info
    for key, want, fix in (("model_id", model.model_id, "score into a new --output, or --mode overwrite"),
                           ("split", split, f"pass --split {info.get('split')}, or --mode overwrite"),
                           ("partition_by", partition_by, f"set score.partition_by={info.get('partition_by')}")):
        if key in info and info[key] != want:
            raise ConfigError(f"--mode append: {output_uri} holds {key} {info[key]!r}, this run has {want!r}: {fix}")
    return prior


def not_yet_scored(spark: "SparkSession", df: "DataFrame", prior: Committed) -> "DataFrame":
    """The rows of ``df`` whose ``image_id`` has neither a prediction nor a reject in ``prior``."""
    done = read_folders(spark, prediction_folders(prior), PREDICTION_DDL).select("image_id")
    if any(f.kind == "rejects" for f in prior.files):
        done = done.unionByName(read_folders(spark, reject_folders(prior), REJECT_DDL).select("image_id"))
    return df.join(done.dropDuplicates(), "image_id", "left_anti")


# --- the plan: what every task gets ------------------------------------------------------------

def make_plan(spark: "SparkSession", scfg: ScoreConfig, model: ModelInfo, driver_file: str) -> ScoringPlan:
    """Ship the model (local masters read the driver's file; clusters get it via SparkFiles) and plan the tasks."""
    sc = spark.sparkContext
    shipped = not is_local_master(sc.master)
    worker_path = driver_file
    if shipped:
        sc.addFile(driver_file)
        worker_path = os.path.basename(driver_file)
    return ScoringPlan(
        model_path=worker_path, shipped=shipped, model_id=model.model_id, classes=model.classes,
        spec=model.spec, norm=model.norm, batch_size=scfg.batch_size, top_k=scfg.top_k,
        intra_op_threads=scfg.intra_op_threads, inter_op_threads=scfg.inter_op_threads,
        scored_at=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0), fault=faults.armed(),
    )


@contextlib.contextmanager
def spread_over_slots(spark: "SparkSession", scfg: ScoreConfig, df: "DataFrame") -> Iterator[Tuple["DataFrame", int]]:
    """``(df, tasks)`` with every task slot busy, under this run's Arrow batch size.

    Arrow batches the size of a model call; the files split along row groups into
    ~tasks_per_slot tasks per slot (no shuffle of image bytes). Only files too few and too
    small to split are repartitioned.
    """
    slots = task_slots(spark)
    confs = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(scfg.batch_size),
             "spark.sql.files.minPartitionNum": str(slots * scfg.tasks_per_slot)}
    with temporary_confs(spark, confs):
        parts = df.rdd.getNumPartitions()
        if parts < slots:
            log.info("input has %d partition(s) for %d task slots: repartitioning", parts, slots)
            df, parts = df.repartition(slots), slots
        log.info("%d tasks on %d task slots", parts, slots)
        yield df, parts


# --- the passes ----------------------------------------------------------------------------------

def count_rows(spark: "SparkSession", df: "DataFrame", what: str) -> int:
    set_job_description(spark, f"pixelmill score: count {what}")
    return df.count()


def score_pass(spark: "SparkSession", df: "DataFrame", plan: ScoringPlan, pred_uri: str, *,
               partition_by: Optional[str]) -> int:
    """One pass: decode, predict, write ``pred_uri``. Returns how many rows did not decode (only counted here)."""
    rejects_seen = spark.sparkContext.accumulator(0)
    set_job_description(spark, f"pixelmill score: predict with model {plan.model_id}")
    scored = df.mapInArrow(functools.partial(score_partition, plan=plan, rejects_seen=rejects_seen),
                           schema=PREDICTION_DDL)
    writer = scored.select(*PREDICTION_COLUMNS).write.mode("overwrite")
    if partition_by:
        writer = writer.partitionBy(partition_by)
    writer.parquet(pred_uri)
    return int(rejects_seen.value)


def count_predictions(spark: "SparkSession", *pred_uris: str) -> Tuple[Dict[Tuple[str, str], int], int]:
    """Confusion counts and unlabeled rows of the predictions in ``pred_uris``, in one aggregation.

    Read back with the declared schema: no partition-type inference ("0".."9" labels stay strings).
    """
    set_job_description(spark, "pixelmill score: count and evaluate the predictions")
    return _metrics.confusion_counts(read_folders(spark, pred_uris, PREDICTION_DDL))


def read_folders(spark: "SparkSession", uris: Sequence[str], schema: str) -> "DataFrame":
    """The union of the Parquet folders ``uris`` with ``schema``, each read on its own: Spark refuses
    several roots of partitioned folders in one read (conflicting directory structures)."""
    return functools.reduce(lambda a, b: a.unionByName(b), [spark.read.schema(schema).parquet(u) for u in uris])


def rejects_pass(spark: "SparkSession", df: "DataFrame", plan: ScoringPlan, rejects_uri: str, *,
                 output_uri: str) -> int:
    """Rare: some stored bytes do not decode. Same decoding again, no model, reject rows only; returns their number."""
    set_job_description(spark, "pixelmill score: write the rejects")
    (df.mapInArrow(functools.partial(reject_partition, plan=plan), schema=REJECT_DDL)
     .select(*REJECT_COLUMNS).write.mode("overwrite").parquet(rejects_uri))
    rejected = spark.read.schema(REJECT_DDL).parquet(rejects_uri).count()
    if rejected:
        log.warning("%d row(s) could not be decoded to %s: see %s/rejects/", rejected,
                    "x".join(map(str, plan.spec.shape)), output_uri)
    else:
        filesystem(rejects_uri, spark).delete(rejects_uri)
    return rejected


def check_accounted(rows_in: int, written: int, rejected: int) -> None:
    if written + rejected != rows_in:
        raise InvariantError(f"scored {rows_in} rows but wrote {written} predictions + {rejected} rejects: "
                             "output discarded; rerun the job")


def write_evaluation(spark: "SparkSession", counts: Mapping[Tuple[str, str], int], unlabeled: int,
                     plan: ScoringPlan, staging: str, *, split: str, data_uri: str) -> Optional[Dict[str, Any]]:
    """``_metrics.json`` + ``confusion_matrix.png`` into ``staging`` when rows have labels; the metrics or None."""
    metrics = _metrics.evaluate_counts(counts, unlabeled, plan.classes)
    if metrics is not None:
        _metrics.write_metrics(spark, {**metrics, "model_id": plan.model_id, "split": split,
                                       "data_uri": data_uri, "scored_at": plan.scored_at.isoformat()},
                               staging, title=f"model {plan.model_id}, split {split}")
    return metrics

"""The ingest stage: raw image files in, clean split-partitioned Parquet out, every file accounted for.

:func:`run` reads as its steps; each step's work lives in one module:

* **check args** and **read the prior manifest** (``--mode append``: :func:`pipeline.contracts.read_manifest`);
* **extract** (:mod:`.extract`, :mod:`.layout`) - Spark's ``binaryFile`` source lists the
  input recursively (every file is counted, non-images become reject rows); files above
  ``ingest.max_file_mb`` are rejected on their listed length without being read; on append,
  files stored and not modified since the previous listing are ``already_ingested`` without
  being read (:mod:`.unchanged`); the per-image ``mapInPandas`` step hashes, places
  (:func:`.layout.place`) and cleans every other file (:func:`pipeline.imaging.clean.clean_image`);
* **transform** (:mod:`.transform`) - labels from a CSV, files already in the output,
  duplicates and label conflicts by content hash;
* **account** (:mod:`.accounting`) - one aggregation gives every count; a lost file fails
  the job before anything is written;
* **load** (:mod:`.load`) - ``images/`` (partitioned by ``split`` only, rows shuffled within a
  split, enough row groups for petastorm sharding), ``rejects/`` and ``_manifest.json`` are
  written to a new version folder, reconciled from the Parquet footers
  (``files_seen == accepted + sum(rejected)``), then committed by one snapshot create
  (:func:`pipeline.commit.versioned_output`).

Fault injection for reliability tests goes through :mod:`pipeline.faults` (point
``ingest.batch``, e.g. ``PIXELMILL_FAULT_INJECT=ingest.batch:kill:once``). See ``docs/ingest.md``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, NamedTuple, Optional, Tuple

from pipeline import faults
from pipeline.commit import check_output_mode, versioned_output
from pipeline.config import Config, IngestConfig
from pipeline.contracts import (IMAGES_DIR, QUALITY_EXAMPLES, REJECTS_DIR, IngestManifest, read_manifest,
                                read_split_images, reject_folders, resolve_ingest, write_manifest)
from pipeline.errors import ConfigError, DataError
from pipeline.fs import FileSystem, filesystem, join, to_uri
from pipeline.imaging.clean import ImageOptions
from pipeline.imaging.reasons import ALREADY_INGESTED
from pipeline.ingest import accounting, extract, layout, load, quality, transform, unchanged
from pipeline.ingest import listing as executor_listing
from pipeline.ingest.accounting import check_invariant, class_mapping
from pipeline.ingest.layout import layout_has_val
from pipeline.schema import QUALITY_FIELDS, REJECT_COLUMNS, SPLIT_COLUMN, STORED_IMAGE_COLUMNS
from pipeline.spark import assert_on_driver, progress, set_job_description, task_slots, temporary_confs

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

    from pipeline.commit import Committed

__all__ = ["MODES", "run", "check_invariant", "class_mapping", "layout_has_val"]

log = logging.getLogger(__name__)

MODES = ("error", "overwrite", "append")


@dataclass(frozen=True)
class _Job:
    """One ingest's checked arguments."""

    spark: "SparkSession"
    cfg: IngestConfig
    input_uri: str
    output_uri: str
    mode: str
    fault: Optional[faults.FaultPlan]
    in_fs: FileSystem
    committed: bool  #: a committed output already exists at ``output_uri``
    input_list: Optional[str] = None  #: a path manifest (``--input-list``): the files to ingest
    on_executors: bool = False  #: listed and read by executor tasks (:mod:`.listing`), not Spark's file index


class _Prior(NamedTuple):
    """On append: the committed output's manifest and its rows."""

    manifest: IngestManifest
    images: "DataFrame"
    rejects: "DataFrame"
    data: "Committed"
    #: The new version lists the prior version's folders and holds only this run's rows (False for an
    #: output of the earlier layout or one without the quality columns: rewritten whole, once).
    incremental: bool


class _Scan(NamedTuple):
    """The extract step's result: the listing and one (lazy) row per file."""

    listing: extract.Listing
    rows: "DataFrame"
    carved: bool  #: val is carved out of the layout's train/ (no val/ folder)
    slots: int  #: task slots the scan and the write are sized for
    listed_at: str  #: when the listing started (the next append's cutoff, :mod:`.unchanged`)
    skip: Optional[unchanged.Plan]  #: on append: the files decided without reading them
    cleaned: Any = None  #: accumulator of the files the per-file step has done (progress only)


class _Outputs(NamedTuple):
    """What the load step writes, with the counts it is reconciled against."""

    images: "DataFrame"
    rejects: "DataFrame"
    run: accounting.RunCounts
    total: accounting.Totals
    quality: Dict[str, Any]  #: the manifest's ``quality`` block
    examples: Dict[str, Any]  #: thumbnails for the report (:data:`pipeline.contracts.QUALITY_EXAMPLES`)


def run(spark: "SparkSession", cfg: Config, *, input_uri: Optional[str] = None, output_uri: str, mode: str = "error",
        input_list: Optional[str] = None) -> Dict[str, Any]:
    """Ingest ``input_uri`` into ``output_uri``; returns the manifest's counts.

    Parameters
    ----------
    spark:
        The session (built by :func:`pipeline.spark.build_session`).
    cfg:
        The config; only ``cfg.ingest`` is used.
    input_uri, output_uri:
        URIs (local paths are accepted and made absolute ``file://`` URIs). With ``input_list``,
        ``input_uri`` is the folder relative paths and class folders are taken from (default: the
        list's folder).
    mode:
        ``error`` (refuse an existing output), ``overwrite`` or ``append``
        (ingest only files not already in the output; splits and classes kept).
    input_list:
        A path manifest (Parquet, or CSV with a header): column ``path`` and optionally ``label``
        and ``split``. Only its files are ingested, listed and read on executors (:mod:`.listing`).
    """
    assert_on_driver()
    t0 = time.perf_counter()
    job = _check_args(spark, cfg.ingest, input_uri=input_uri, output_uri=output_uri, mode=mode, input_list=input_list)
    prior = _read_prior(job)
    timings: Dict[str, float] = {}
    with contextlib.ExitStack() as held:  # session confs and cached frames of this job, released at the end
        scan = _extract(job, prior, held, timings)
        resolved = scan.rows.transform(_per_file, job, prior).transform(_dedup, prior)
        outputs = _account(job, prior, scan, resolved, held, timings)
        return _load(job, prior, scan, outputs, timings, t0)


# --- the steps ------------------------------------------------------------------------

def _check_args(spark: "SparkSession", icfg: IngestConfig, *, input_uri: Optional[str], output_uri: str, mode: str,
                input_list: Optional[str] = None) -> _Job:
    """Every argument checked before anything is read or written (an uncommitted output is removed)."""
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    if input_list is not None:
        input_list = to_uri(input_list)
        if not filesystem(input_list, spark).exists(input_list):
            raise ConfigError(f"--input-list {input_list} does not exist: pass a Parquet file or folder, or a .csv, "
                              "with a 'path' column")
        input_uri = input_uri or input_list.rsplit("/", 1)[0]
    if input_uri is None:
        raise ConfigError("ingest needs --input (a folder of images) or --input-list (a Parquet/CSV list of paths)")
    input_uri, output_uri = to_uri(input_uri), to_uri(output_uri)
    on_executors = input_list is not None or icfg.listing == "executors"
    if on_executors:
        executor_listing.check_supported(input_uri)
    if layout.overlap(output_uri, input_uri):
        raise ConfigError(f"--output {output_uri} and --input {input_uri} overlap: choose an output outside the input")
    if icfg.label_source == "manifest" and icfg.manifest_uri is None:  # pragma: no cover - config validates
        raise ConfigError("ingest.label_source=manifest needs ingest.manifest_uri")
    fault = faults.armed()
    in_fs = filesystem(input_uri, spark)
    if input_list is None and not in_fs.is_dir(input_uri):
        raise DataError(f"input {input_uri} is not an existing folder: pass the folder holding the class folders")
    if icfg.label_source == "manifest":
        csv = to_uri(icfg.manifest_uri or "")
        if not filesystem(csv, spark).exists(csv):
            raise ConfigError(f"config key 'ingest.manifest_uri': {csv} does not exist "
                              "(pass a CSV with a path,label header)")
    # also removes an uncommitted (crashed) write
    committed = check_output_mode(filesystem(output_uri, spark), output_uri, mode)
    return _Job(spark, icfg, input_uri, output_uri, mode, fault, in_fs, committed, input_list, on_executors)


def _read_prior(job: _Job) -> Optional[_Prior]:
    """On append to a committed output: its manifest (same image settings required) and its rows."""
    if job.mode != "append":
        return None
    if not job.committed:
        log.info("--mode append: %s holds no committed output yet, ingesting everything", job.output_uri)
        return None
    data = resolve_ingest(job.output_uri, spark=job.spark)
    manifest = read_manifest(data.root, spark=job.spark)
    if manifest.get("image", {}) != load.image_block(job.cfg):
        raise ConfigError(f"--mode append: ingest.height/width/color_mode/encode_format differ from the existing "
                          f"output ({manifest.get('image')}); use the same settings or --mode overwrite")
    images = _read_images(job.spark, data, manifest)
    rejects = job.spark.read.parquet(*reject_folders(data))
    incremental = data.version is not None and set(STORED_IMAGE_COLUMNS) <= set(images.columns)
    if not incremental:
        log.info("--mode append: %s is of an earlier layout: this append rewrites it whole, later ones write only "
                 "their new files", job.output_uri)
    return _Prior(manifest, images, rejects, data, incremental)


def _read_images(spark: "SparkSession", data: "Committed", manifest: IngestManifest) -> "DataFrame":
    """Every stored image of version ``data``, each split from the folders its snapshot lists."""
    splits = sorted(k for k, v in manifest.splits.items() if v > 0)
    if not splits:
        return spark.read.parquet(join(data.root, IMAGES_DIR))
    return read_split_images(spark, data, splits)


def _extract(job: _Job, prior: Optional[_Prior], held: contextlib.ExitStack, timings: Dict[str, float]) -> _Scan:
    """List the input, size the scan (confs held until the job ends), clean every file."""
    if job.on_executors:
        return _extract_on_executors(job, prior, held, timings)
    spark, icfg = job.spark, job.cfg
    t = time.perf_counter()
    set_job_description(spark, f"ingest: list {job.input_uri}")
    started = unchanged.listed_at()
    listing = extract.list_input(spark, job.input_uri)
    timings["list_s"] = round(time.perf_counter() - t, 3)
    log.info("ingest: %d files under %s (%.1fs)", listing.files_seen, job.input_uri, timings["list_s"])
    if listing.files_seen == 0:
        raise DataError(f"no files under {job.input_uri} (files whose names start with '.' or '_' are hidden from Spark)")
    slots = task_slots(spark)
    # sized for every listed file (an append's pass over the listing), then for the files read
    held.enter_context(temporary_confs(
        spark, extract.scan_confs(listing.files_seen, listing.input_bytes, slots, icfg.batch_rows)))
    max_bytes = icfg.max_file_mb * 1024 * 1024
    skip = _skip_plan(job, prior, extract.listed_files(listing.raw), held, timings, max_bytes=max_bytes)
    if skip is not None:
        held.enter_context(temporary_confs(
            spark, extract.scan_confs(skip.files, skip.bytes, slots, icfg.batch_rows)))
    carve = _carve(job, prior)
    cleaned = spark.sparkContext.accumulator(0)
    fn = extract.clean_batches(ImageOptions.from_config(icfg), root_uri=job.input_uri, label_source=icfg.label_source,
                               fractions=icfg.split_fractions, seed=icfg.seed, carve=carve, fault=job.fault,
                               counter=cleaned)
    processed = extract.scanned(unchanged.reads(listing.raw, skip), fn, max_bytes=max_bytes).unionByName(
        extract.too_large_files(listing.raw, max_file_mb=icfg.max_file_mb, listed=skip.listed if skip else None),
        allowMissingColumns=True)
    return _Scan(listing, processed, carve is not None, slots, started, skip, cleaned)


def _extract_on_executors(job: _Job, prior: Optional[_Prior], held: contextlib.ExitStack,
                          timings: Dict[str, float]) -> _Scan:
    """:func:`_extract` with the listing and the reads on executors (:mod:`.listing`): the driver
    holds folder names and counts, never a row per file."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    spark, icfg = job.spark, job.cfg
    t = time.perf_counter()
    started = unchanged.listed_at()
    slots = task_slots(spark)
    listed_n = None
    if job.input_list is not None:
        set_job_description(spark, f"ingest: read the path list {job.input_list}")
        listed = executor_listing.from_list(spark, job.input_list, job.input_uri)
    else:
        set_job_description(spark, f"ingest: list {job.input_uri} on executors")
        listed_n = spark.sparkContext.accumulator(0)
        listed, _ = executor_listing.list_files(spark, job.input_uri, slots=slots, counter=listed_n)
    listed = _persisted(held, listed, StorageLevel.MEMORY_AND_DISK)
    with progress(spark, "ingest: listing", counter=listed_n, unit="files listed"):
        counted = executor_listing.count(listed)
    timings["list_s"] = round(time.perf_counter() - t, 3)
    log.info("ingest: %d files under %s, listed on executors (%.1fs)", counted.files,
             job.input_list or job.input_uri, timings["list_s"])
    if counted.files == 0:
        raise DataError(f"no files in {job.input_list}" if job.input_list else
                        f"no files under {job.input_uri} (files whose names start with '.' or '_' are hidden)")
    if counted.bad_splits:
        raise ConfigError(f"--input-list {job.input_list}: {counted.bad_splits} rows have a split other than "
                          f"{', '.join(layout.SPLIT_ORDER)}: fix them or leave the split empty (then it is hashed)")
    max_bytes = icfg.max_file_mb * 1024 * 1024
    cleaned = spark.sparkContext.accumulator(0)
    to_read, n, nbytes = listed, counted.files, counted.bytes
    skip = _skip_plan(job, prior, listed.withColumn("file_path", F.col("source_path")), held, timings,
                      max_bytes=max_bytes, named=False)
    if skip is not None:
        to_read, n, nbytes = skip.to_read, skip.files, skip.bytes
    held.enter_context(temporary_confs(spark, extract.scan_confs(n, nbytes, slots, icfg.batch_rows)))
    carve = _carve(job, prior)
    fn = executor_listing.read_and_clean(ImageOptions.from_config(icfg), max_bytes=max_bytes, root_uri=job.input_uri,
                                label_source=icfg.label_source, fractions=icfg.split_fractions, seed=icfg.seed,
                                carve=carve, fault=job.fault, counter=cleaned)
    tasks = executor_listing.read_tasks(n, nbytes, slots)
    processed = to_read.repartition(tasks, "source_path").mapInPandas(fn, extract.PROCESSED_DDL)
    return _Scan(extract.Listing(None, None, counted.files, counted.bytes), processed, carve is not None, slots,
                 started, skip, cleaned)


def _skip_plan(job: _Job, prior: Optional[_Prior], listed: "DataFrame", held: contextlib.ExitStack,
               timings: Dict[str, float], *, max_bytes: int, named: bool = True) -> Optional[unchanged.Plan]:
    """On append after an ingest of the same input: the files not to read (:mod:`.unchanged`), else None.

    ``listed``: the listing's ``file_path, source_path, mtime, size`` rows; ``named`` as in
    :func:`.unchanged.plan`. A path manifest's files are always read.
    """
    from pyspark import StorageLevel

    if prior is None or job.input_list is not None:
        return None
    at = unchanged.cutoff(job.cfg, prior.manifest.listed_at, job.input_uri)
    if at is None:
        return None
    t = time.perf_counter()
    set_job_description(job.spark, "ingest: find the files unchanged since the last ingest")
    stored = prior.images.select("source_path").unionByName(prior.rejects.select("source_path"))
    skip = unchanged.plan(listed, stored, at, max_bytes=max_bytes,
                          persist=lambda df: _persisted(held, df, StorageLevel.MEMORY_AND_DISK), named=named)
    timings["unchanged_s"] = round(time.perf_counter() - t, 3)
    return skip


def _carve(job: _Job, prior: Optional[_Prior]) -> Optional[Dict[str, float]]:
    """Fractions carving val out of the layout's train/ when the input has no val/ folder, else None."""
    if prior is not None and "val_carved_from_train" in prior.manifest:
        carve_val = bool(prior.manifest["val_carved_from_train"])  # appends keep the first run's decision
    else:
        carve_val = job.cfg.carve_val_from_train and not layout_has_val(job.in_fs, job.input_uri)
    carve = layout.carve_fractions(job.cfg.split_fractions) if carve_val else None
    if carve is not None:
        log.info("ingest: no val/ folder: %.1f%% of the layout's train/ files become val (by content hash)",
                 100 * carve["val"])
    return carve


def _per_file(df: "DataFrame", job: _Job, prior: Optional[_Prior]) -> "DataFrame":
    """The row-wise transforms (labels from a CSV, already ingested) any file row goes through."""
    if job.cfg.label_source == "manifest":
        df = transform.with_manifest_labels(job.spark, df, job.cfg.manifest_uri, job.input_uri)
    if prior is not None:
        df = transform.with_already_ingested(df, prior.images, prior.rejects)
    return df


def _dedup(df: "DataFrame", prior: Optional[_Prior]) -> "DataFrame":
    """Duplicates and label conflicts by content hash, within the run and against the output's rows."""
    df = df.transform(transform.with_duplicates_resolved)
    if prior is not None:
        df = transform.with_prior_duplicates(df, prior.images)
    return df


def _account(job: _Job, prior: Optional[_Prior], scan: _Scan, resolved: "DataFrame", held: contextlib.ExitStack,
             timings: Dict[str, float]) -> _Outputs:
    """Run the cleaning (one aggregation), count every file and check the count; the frames to write."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    spark, listing = job.spark, scan.listing
    resolved = _persisted(held, resolved, StorageLevel.MEMORY_AND_DISK)
    t = time.perf_counter()
    set_job_description(spark, f"ingest: clean {listing.files_seen} files and group near-duplicates")
    with progress(spark, f"ingest: cleaning {listing.files_seen} files", counter=scan.cleaned,
                  total=scan.skip.files if scan.skip is not None else listing.files_seen, unit="files cleaned"):
        resolved, near, pairs = quality.apply(resolved, job.cfg, prior.images if prior is not None else None,
                                              rows_at_most=listing.files_seen + (prior.manifest.accepted if prior else 0),
                                              on_executors=job.on_executors)
    timings["near_dups_s"] = round(time.perf_counter() - t, 3)  # includes the scan, which it runs first
    groups = accounting.group_counts(resolved)
    if scan.skip is not None:  # the files not read are only counted
        groups.append(accounting.counted_group(ALREADY_INGESTED, scan.skip.unchanged))
    scanned = sum(g["n"] for g in groups)
    if scanned < listing.files_seen and listing.raw is not None:
        # Spark's scan skips zero-byte files: only now, and only when some are missing, the
        # listing is compared with the scanned paths (one path-only pass, no content read).
        log.info("ingest: %d listed files never reach the scan (0 bytes)", listing.files_seen - scanned)
        unscanned = extract.unscanned_files(spark, listing, unchanged.listing_of(scan.skip)).transform(
            _per_file, job, prior)
        unscanned = _persisted(held, unscanned.select(
            *[F.col(c) if c in unscanned.columns else F.lit(None).cast(resolved.schema[c].dataType).alias(c)
              for c in resolved.columns]), StorageLevel.MEMORY_AND_DISK)
        groups = groups + accounting.group_counts(unscanned)
        resolved = resolved.unionByName(unscanned)
    timings["clean_s"] = round(time.perf_counter() - t, 3)

    run_ = accounting.run_counts(groups)
    log.info("ingest: cleaned %d files in %.1fs: %d accepted, rejected %s", run_.accounted, timings["clean_s"],
             run_.accepted, dict(sorted(run_.rejected.items())) or "none")
    accounting.check_run_accounted(listing.files_seen, run_)
    total = accounting.totals(prior.manifest if prior else None, run_, listing.files_seen, job.cfg,
                              ImageOptions.from_config(job.cfg).channels)
    set_job_description(spark, "ingest: quality examples")
    t = time.perf_counter()
    block = quality.block(job.cfg, accounting.flag_counts(groups), near, prior.manifest if prior else None)
    shown = quality.examples(resolved, pairs)
    timings["quality_s"] = round(time.perf_counter() - t, 3)
    return _Outputs(*_to_write(resolved, prior, total.classes), run_, total, block, shown)


def _to_write(resolved: "DataFrame", prior: Optional[_Prior],
              classes: Dict[str, int]) -> Tuple["DataFrame", "DataFrame"]:
    """``(images, rejects)`` to write: this run's accepted / rejected rows, plus the prior ones when the
    prior output is rewritten (an incremental append lists the prior folders instead)."""
    from pyspark.sql import functions as F

    images = (
        resolved.filter(F.col("reason").isNull())
        .select(*[c for c in STORED_IMAGE_COLUMNS if c != "label_index"])
        .transform(transform.with_label_index, classes)
        .select(*STORED_IMAGE_COLUMNS)
    )
    rejects = resolved.filter(F.col("reason").isNotNull() & (F.col("reason") != ALREADY_INGESTED)).select(*REJECT_COLUMNS)
    if prior is not None and not prior.incremental:
        old = prior.images
        # outputs written before the quality columns existed get them as nulls
        old = old.withColumns({f.name: F.lit(None).cast(f.spark_type) for f in QUALITY_FIELDS
                               if f.name not in old.columns})
        images = images.unionByName(old.select(*STORED_IMAGE_COLUMNS))
        rejects = rejects.unionByName(prior.rejects.select(*REJECT_COLUMNS))
    return images, rejects


def _persisted(held: contextlib.ExitStack, df: "DataFrame", level: Any) -> "DataFrame":
    """``df`` persisted until the job ends."""
    df = df.persist(level)
    held.callback(df.unpersist)
    return df


def _load(job: _Job, prior: Optional[_Prior], scan: _Scan, out: _Outputs, timings: Dict[str, float],
          t0: float) -> Dict[str, Any]:
    """Write to staging, reconcile with the counts, write the manifest, commit; returns the summary."""
    spark, icfg, total = job.spark, job.cfg, out.total
    incremental = prior is not None and prior.incremental
    # What this version's own folder holds: an incremental append writes only this run's rows.
    written = out.run if incremental else total
    n_train = written.splits.get("train", 0)
    tasks, rows_per_file = load.plan_files(n_train, written.accepted, written.image_bytes, icfg, scan.slots)
    with versioned_output(spark, job.output_uri, info={"stage": "ingest", "files_seen": total.files_seen},
                          retain=icfg.retain_versions) as version:
        staging = version.uri
        t = time.perf_counter()
        set_job_description(spark, f"ingest: write {total.accepted} images")
        # A first run's rows are already hash-partitioned by image_id (the duplicate window):
        # classes are mixed, no reshuffle; appended rows are repartitioned with the prior ones.
        load.write_images(out.images, staging, icfg, tasks=tasks if prior is not None else None,
                          rows_per_file=rows_per_file)
        set_job_description(spark, "ingest: write rejects")
        load.write_rejects(out.rejects, staging, sum(total.rejected.values()))
        timings["write_s"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        set_job_description(spark, "ingest: reconcile")
        staged = filesystem(staging, spark)
        new_rejects = sum(v for k, v in written.rejected.items() if k != ALREADY_INGESTED)
        files_written = total.files_seen - (int(prior.manifest.files_seen) if incremental else 0)
        row_groups = load.reconcile(staged, staging, files_written, {k: v for k, v in written.splits.items() if v})
        if incremental:
            row_groups = {s: row_groups.get(s, 0) + int(prior.manifest.row_groups.get(s, 0))
                          for s in sorted(set(row_groups) | set(prior.manifest.row_groups))}
        timings["reconcile_s"] = round(time.perf_counter() - t, 3)
        load.warn_if_few_row_groups(row_groups, n_train, icfg)
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        manifest = load.build_manifest(
            cfg=icfg, prior=prior.manifest if prior else None, input_uri=job.input_uri, output_uri=job.output_uri,
            mode=job.mode, carved=scan.carved, total=total, run=out.run, files_seen=scan.listing.files_seen,
            files_read=scan.skip.files if scan.skip else None, listed_at=scan.listed_at, row_groups=row_groups,
            timings=timings)
        manifest["quality"] = out.quality
        if job.input_list is not None:
            manifest["input_list"] = job.input_list
        staged.write_json(join(staging, QUALITY_EXAMPLES), out.examples)
        write_manifest(staged, staging, manifest)
        if incremental:  # the prior version's folders stay part of the output
            for f in prior.data.files:
                if f.kind in ("images", "rejects"):
                    version.add(join(prior.data.uri, f.path), f.rows, f.kind)
        for split, rows in sorted(written.splits.items()):
            if rows:
                version.add(join(staging, IMAGES_DIR, f"{SPLIT_COLUMN}={split}"), rows, "images")
        version.add(join(staging, REJECTS_DIR), new_rejects, "rejects")
        version.info.update({"accepted": total.accepted, "rejected": dict(total.rejected),
                             "splits": dict(total.splits), "mode": job.mode})
    log.info("ingest: committed %s: %d accepted, %d rejected, splits %s, %.0f files/s", job.output_uri,
             total.accepted, sum(total.rejected.values()), manifest["splits"], manifest["images_per_second"])
    return {k: manifest[k] for k in ("files_seen", "accepted", "rejected", "splits", "class_counts", "classes",
                                     "row_groups", "images_per_second", "run", "timings")} | {
        "output": job.output_uri, "version": version.version, "version_root": staging,
        "written": {"accepted": written.accepted, "rejected": new_rejects, "incremental": incremental}}

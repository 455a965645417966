"""The ingest stage: raw image files in, clean split-partitioned Parquet out, every file accounted for.

Extract -> transform -> load:

* **extract** - Spark's ``binaryFile`` source lists ``input_uri`` recursively
  (no glob filter: every file is counted, non-images become reject rows);
  files above ``ingest.max_file_mb`` are rejected on their listed length
  without being read.
* **transform** - :func:`clean_batches` runs :func:`pipeline.images.clean_image`
  over Arrow batches in ``mapInPandas`` (hash, validate, normalise, resize,
  re-encode, per-image pixel sums); then duplicates and label conflicts are
  resolved by content hash, classes are mapped and the split is fixed.
* **load** - ``images/`` (partitioned by ``split`` only, rows shuffled within a
  split, enough row groups for petastorm sharding), ``rejects/`` and
  ``_manifest.json`` are written to a staging folder, re-read and reconciled
  (``files_seen == accepted + sum(rejected)``), then committed atomically with
  :func:`pipeline.storage.atomic_output`.

Fault injection for reliability tests (read on the driver, so it reaches
executors through the task closure on any master):
``PIXELMILL_FAULT_INJECT=ingest_batch_once|ingest_worker_kill_once|ingest_drop_row``
with ``PIXELMILL_FAULT_MARKER=/shared/path`` (the fault fires once, in the first
batch that creates the marker file). See ``docs/ingest.md``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import pandas as pd  # module level: mapInPandas functions are resolved against module globals

from pipeline import images as im
from pipeline.config import Config, IngestConfig
from pipeline.errors import ConfigError, DataError, InvariantError
from pipeline.schema import IMAGE_COLUMNS, REJECT_COLUMNS, SPLIT_COLUMN, UNLABELED_SPLIT
from pipeline.spark import assert_on_driver, set_job_description, task_slots, temporary_confs
from pipeline.storage import HadoopFS, atomic_output, check_output_mode, join, to_uri

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
IMAGES_DIR = "images"
REJECTS_DIR = "rejects"
MANIFEST_VERSION = 1
MODES = ("error", "overwrite", "append")

FAULT_ENV = "PIXELMILL_FAULT_INJECT"
FAULT_MARKER_ENV = "PIXELMILL_FAULT_MARKER"
FAULTS = ("ingest_batch_once", "ingest_worker_kill_once", "ingest_drop_row")

#: Output of the per-image step (one row per file): the stored columns plus bookkeeping.
PROCESSED_DDL = (
    "source_path string, image_id string, label string, split string, reason string, detail string, "
    "image binary, height int, width int, channels int, format string, "
    "s0 double, s1 double, s2 double, q0 double, q1 double, q2 double, npix long"
)
_STAT_COLS = ("s0", "s1", "s2", "q0", "q1", "q2")


# --- transform: per-image work on executors -------------------------------------

def _maybe_fault(fault: Optional[str], marker: Optional[str]) -> bool:
    """Fire the injected fault once (the first batch that creates ``marker``); True = drop a row."""
    if not fault or not marker:
        return False
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    if fault == "ingest_batch_once":
        raise RuntimeError(f"{FAULT_ENV}=ingest_batch_once: injected failure of one ingest batch")
    if fault == "ingest_worker_kill_once":
        os.kill(os.getpid(), signal.SIGKILL)
    return fault == "ingest_drop_row"


def clean_batches(
    opts: im.ImageOptions,
    *,
    root_uri: str,
    label_source: str,
    fractions: Mapping[str, float],
    seed: int,
    carve: Optional[Mapping[str, float]] = None,
    fault: Optional[str] = None,
    fault_marker: Optional[str] = None,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The ``mapInPandas`` function: ``(path, content)`` batches -> :data:`PROCESSED_DDL` batches."""
    fractions = dict(fractions)

    def fn(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            drop = _maybe_fault(fault, fault_marker)
            rows: Dict[str, List[Any]] = {c.split()[0]: [] for c in PROCESSED_DDL.split(", ")}
            for path, content in zip(pdf["path"].tolist(), pdf["content"].tolist()):
                if drop:
                    drop = False
                    continue
                data = bytes(content) if content is not None else b""
                source = im.normalize_source(path)
                iid = im.image_id(data)
                split, rest = im.layout_split(im.relative_parts(path, root_uri))
                if split == "train" and carve is not None:
                    split = im.hash_split(iid, carve, seed)
                label = im.folder_label(rest) if label_source == "folders" else None
                if split is None:
                    split = UNLABELED_SPLIT if label_source == "none" else im.hash_split(iid, fractions, seed)
                res = im.clean_image(data, path, opts)
                if isinstance(res, im.Cleaned) and label_source == "folders" and label is None:
                    res = im.Rejected(im.NO_LABEL, "file is not inside a class folder (<input>/[<split>/]<label>/...)")
                rows["source_path"].append(source)
                rows["image_id"].append(iid)
                rows["label"].append(label)
                rows["split"].append(split)
                if isinstance(res, im.Cleaned):
                    rows["reason"].append(None)
                    rows["detail"].append(None)
                    rows["image"].append(res.image)
                    rows["height"].append(res.height)
                    rows["width"].append(res.width)
                    rows["channels"].append(res.channels)
                    rows["format"].append(res.format)
                    sums = list(res.pixel_sum) + [None] * (3 - len(res.pixel_sum))
                    sqs = list(res.pixel_sumsq) + [None] * (3 - len(res.pixel_sumsq))
                    for k, v in zip(_STAT_COLS, sums + sqs):
                        rows[k].append(v)
                    rows["npix"].append(res.pixel_count)
                else:
                    rows["reason"].append(res.reason)
                    rows["detail"].append(res.detail[:1000])
                    for k in ("image", "height", "width", "channels", "format", *_STAT_COLS, "npix"):
                        rows[k].append(None)
            out = pd.DataFrame({
                **{k: rows[k] for k in ("source_path", "image_id", "label", "split", "reason", "detail", "image")},
                **{k: pd.array(rows[k], dtype="Int32") for k in ("height", "width", "channels")},
                "format": rows["format"],
                **{k: pd.array(rows[k], dtype="Float64") for k in _STAT_COLS},
                "npix": pd.array(rows["npix"], dtype="Int64"),
            })
            yield out

    return fn


# --- helpers ---------------------------------------------------------------------

def _fault_settings() -> Tuple[Optional[str], Optional[str]]:
    fault = os.environ.get(FAULT_ENV, "").strip() or None
    if fault is None:
        return None, None
    if fault not in FAULTS:
        raise ConfigError(f"{FAULT_ENV}={fault!r} is not a known fault: choose one of {', '.join(FAULTS)}")
    marker = os.environ.get(FAULT_MARKER_ENV) or os.path.join(tempfile.gettempdir(), f"pixelmill-fault-{uuid.uuid4().hex}")
    log.warning("fault injection armed: %s (marker %s)", fault, marker)
    return fault, marker


def _is_under(child: str, parent: str) -> bool:
    c, p = im.uri_path(child).rstrip("/"), im.uri_path(parent).rstrip("/")
    return c == p or c.startswith(p + "/")


def _footer_counts(spark: "SparkSession", fs: HadoopFS, folders: List[str]) -> Dict[str, Tuple[int, int]]:
    """Folder -> (row groups, rows) of its Parquet files (footers only, through the JVM: any filesystem).

    Reading footers on the driver costs one small read per file (files are few and large), and
    no Spark job: this is how the staged output is reconciled with the counts. The reads go
    through a few threads (each has its own py4j connection): one at a time, 46 footers took
    0.5-0.9 s, mostly round trips.
    """
    from concurrent.futures import ThreadPoolExecutor

    jvm = spark.sparkContext._jvm  # noqa: SLF001
    conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001

    def footer(f: str) -> Tuple[int, int]:
        reader = jvm.org.apache.parquet.hadoop.ParquetFileReader.open(
            jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(jvm.org.apache.hadoop.fs.Path(f), conf))
        try:
            return int(reader.getRowGroups().size()), int(reader.getRecordCount())
        finally:
            reader.close()

    files = [(d, f) for d in folders for f in fs.list(d) if f.endswith(".parquet")]
    out = {d: (0, 0) for d in folders}
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        for (d, _), (groups, rows) in zip(files, pool.map(footer, [f for _, f in files])):
            out[d] = (out[d][0] + groups, out[d][1] + rows)
    return out


def _split_dirs(fs: HadoopFS, images_dir: str) -> List[str]:
    """The split values of the ``split=<value>`` folders under ``images_dir``."""
    prefix = f"{SPLIT_COLUMN}="
    if not fs.exists(images_dir):
        return []
    out = []
    for f in fs.list(images_dir):
        name = f.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(prefix):
            out.append(_unescape_partition(name[len(prefix):]))
    return sorted(out)


def _unescape_partition(value: str) -> str:
    """Undo Hive-style partition escaping (``%2F`` -> ``/``), as Spark does when reading."""
    from urllib.parse import unquote

    return unquote(value)


def _combine_stats(prior: Optional[Mapping[str, Any]], sums: List[float], sqs: List[float], n: int,
                   channels: int) -> Tuple[List[float], List[float], int]:
    """Add a prior manifest's train stats (mean/std/pixels) to new sums, for appends."""
    if not prior or not prior.get("pixels") or not prior.get("mean"):
        return sums, sqs, n
    pn = int(prior["pixels"])
    ps = [m * pn for m in prior["mean"]]
    pq = [(s * s + m * m) * pn for m, s in zip(prior["mean"], prior["std"])]
    return [a + b for a, b in zip(sums, ps)], [a + b for a, b in zip(sqs, pq)], n + pn


def scan_confs(files: int, input_bytes: int, slots: int, batch_rows: int) -> Dict[str, str]:
    """Session confs for the binaryFile scan: about 2 input tasks per slot, Arrow batches <= ~64 MiB.

    Few large input partitions keep per-task and per-batch overhead small; the open cost is
    lowered so that thousands of tiny files do not each count as 4 MiB.
    """
    open_cost = 16 * 1024
    tasks = max(2 * slots, math.ceil(input_bytes / (128 * 1024 * 1024)))
    split = max(1024 * 1024, math.ceil((input_bytes + files * open_cost) / tasks))
    avg = max(1, input_bytes // max(1, files))
    rows = max(1, min(batch_rows, (64 * 1024 * 1024) // avg))
    return {
        "spark.sql.files.openCostInBytes": str(open_cost),
        "spark.sql.files.maxPartitionBytes": str(split),
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(rows),
    }


def _listed_bytes(raw: "DataFrame") -> int:
    """Sum of the listed files' lengths, from the file index Spark already built (driver only, no job)."""
    try:
        # A Scala BigInt: py4j hands it over as a Python int (str() covers a JavaObject too).
        return int(str(raw._jdf.queryExecution().optimizedPlan().stats().sizeInBytes()))  # noqa: SLF001
    except Exception:  # pragma: no cover - API drift: fall back to a length-only pass
        log.warning("ingest: the file index gave no size; summing file lengths with a Spark job")
        from pyspark.sql import functions as F

        return int(raw.agg(F.sum("length")).first()[0] or 0)


def _plan_files(n_train: int, total_rows: int, total_bytes: int, cfg: IngestConfig, slots: int) -> Tuple[int, int]:
    """(write tasks, max rows per file) so train gets >= 4 x max_train_procs row groups, files ~target size."""
    need = 4 * cfg.max_train_procs
    avg = max(1.0, total_bytes / max(1, total_rows))
    rows_per_target = max(1, int(cfg.target_file_mb * 1024 * 1024 / avg))
    rows_per_file = rows_per_target
    if n_train > 0:
        # One file holds one row group (files stay below parquet.block.size), so the train split
        # is cut into at least `need` files: tiny data gets small files rather than too few shards.
        rows_per_file = max(1, min(rows_per_target, n_train // need))
    tasks = max(slots, math.ceil(total_bytes / (cfg.target_file_mb * 1024 * 1024)))
    return tasks, rows_per_file


# --- the job -----------------------------------------------------------------------

def run(spark: "SparkSession", cfg: Config, *, input_uri: str, output_uri: str, mode: str = "error") -> Dict[str, Any]:
    """Ingest ``input_uri`` into ``output_uri``; returns the manifest's counts.

    Parameters
    ----------
    spark:
        The session (built by :func:`pipeline.spark.build_session`).
    cfg:
        The config; only ``cfg.ingest`` is used.
    input_uri, output_uri:
        URIs (local paths are accepted and made absolute ``file://`` URIs).
    mode:
        ``error`` (refuse an existing output), ``overwrite`` or ``append``
        (ingest only files not already in the output; splits and classes kept).
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    assert_on_driver()
    t0 = time.perf_counter()
    icfg = cfg.ingest
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)} (got {mode!r})")
    input_uri, output_uri = to_uri(input_uri), to_uri(output_uri)
    if _is_under(output_uri, input_uri) or _is_under(input_uri, output_uri):
        raise ConfigError(f"--output {output_uri} and --input {input_uri} overlap: choose an output outside the input")
    if icfg.label_source == "manifest" and icfg.manifest_uri is None:  # pragma: no cover - config validates
        raise ConfigError("ingest.label_source=manifest needs ingest.manifest_uri")
    fault, marker = _fault_settings()
    fs = HadoopFS(spark)
    if not fs.is_dir(input_uri):
        raise DataError(f"input {input_uri} is not an existing folder: pass the folder holding the class folders")
    if icfg.label_source == "manifest" and not fs.exists(to_uri(icfg.manifest_uri or "")):
        raise ConfigError(f"config key 'ingest.manifest_uri': {to_uri(icfg.manifest_uri or '')} does not exist "
                          "(pass a CSV with a path,label header)")
    committed = check_output_mode(fs, output_uri, mode)  # also removes an uncommitted (crashed) write
    prior: Optional[Dict[str, Any]] = None
    if mode == "append" and committed:
        prior = fs.read_json(join(output_uri, MANIFEST))
        if prior.get("version") != MANIFEST_VERSION:
            raise DataError(f"{output_uri} has manifest version {prior.get('version')!r}, expected {MANIFEST_VERSION}: "
                            "re-ingest with --mode overwrite")
        if prior.get("image", {}) != _image_block(icfg):
            raise ConfigError(f"--mode append: ingest.height/width/color_mode/encode_format differ from the existing "
                              f"output ({prior.get('image')}); use the same settings or --mode overwrite")
    elif mode == "append":
        log.info("--mode append: %s holds no committed output yet, ingesting everything", output_uri)

    opts = im.ImageOptions.from_config(icfg)
    timings: Dict[str, float] = {}
    confs = contextlib.ExitStack()  # session confs set for this job, restored at the end
    persisted: List["DataFrame"] = []
    try:
        # ---- extract ---------------------------------------------------------------
        t = time.perf_counter()
        set_job_description(spark, f"ingest: list {input_uri}")
        raw = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(input_uri)
        # The file index's listing is the witness for the invariant. Spark's scan silently skips
        # zero-byte files, so they are found by comparing the listing with what the scan yields.
        listed_files = raw._jdf.inputFiles()  # noqa: SLF001 - a JVM array: only its length crosses py4j
        files_seen = len(listed_files)
        # Total bytes from the same index (no Spark job): it sizes the scan's tasks before any scan runs.
        input_bytes = _listed_bytes(raw)
        timings["list_s"] = round(time.perf_counter() - t, 3)
        log.info("ingest: %d files under %s (%.1fs)", files_seen, input_uri, timings["list_s"])
        if files_seen == 0:
            raise DataError(f"no files under {input_uri} (files whose names start with '.' or '_' are hidden from Spark)")

        max_bytes = icfg.max_file_mb * 1024 * 1024
        slots = task_slots(spark)
        confs.enter_context(temporary_confs(spark, scan_confs(files_seen, input_bytes, slots, icfg.batch_rows)))
        if prior is not None and "val_carved_from_train" in prior:
            carve_val = bool(prior["val_carved_from_train"])  # appends keep the first run's decision
        else:
            carve_val = icfg.carve_val_from_train and not layout_has_val(fs, input_uri)
        carve = im.carve_fractions(icfg.split_fractions) if carve_val else None
        if carve is not None:
            log.info("ingest: no val/ folder: %.1f%% of the layout's train/ files become val (by content hash)",
                     100 * carve["val"])
        fn = clean_batches(opts, root_uri=input_uri, label_source=icfg.label_source,
                           fractions=icfg.split_fractions, seed=icfg.seed, carve=carve,
                           fault=fault, fault_marker=marker)
        processed = (
            raw.filter(F.col("length") <= max_bytes)  # pushed into the scan: big files are never read
            .select("path", "content")
            .mapInPandas(fn, PROCESSED_DDL)
        )
        too_large = (
            # Not pushed into the scan on purpose: a pushed filter that drops thousands of files in a
            # row makes Spark's FileScanRDD recurse once per skipped file (StackOverflowError seen
            # with 10,000 files per partition). Without content in the projection nothing is read.
            raw.select("path", "length")
            .filter(F.greatest(F.col("length"), F.lit(0)) > max_bytes)
            .select(
                _norm_source_col(F.col("path")).alias("source_path"),
                F.lit(None).cast("string").alias("image_id"),
                F.lit(None).cast("string").alias("label"),
                F.lit(None).cast("string").alias("split"),
                F.lit(im.FILE_TOO_LARGE).alias("reason"),
                F.concat(F.lit("file has "), F.col("length").cast("string"),
                         F.lit(f" bytes > ingest.max_file_mb={icfg.max_file_mb} MiB")).alias("detail"),
            )
        )
        processed = processed.unionByName(too_large, allowMissingColumns=True)

        # ---- transform: already ingested, duplicates, label conflicts ------------------
        prior_images = prior_rejects = None
        if prior is not None:
            prior_images = spark.read.parquet(join(output_uri, IMAGES_DIR))
            prior_rejects = spark.read.parquet(join(output_uri, REJECTS_DIR))

        def per_file(df: "DataFrame") -> "DataFrame":
            """The row-wise steps (labels from a manifest, already ingested) any file row goes through."""
            if icfg.label_source == "manifest":
                df = with_manifest_labels(spark, df, icfg.manifest_uri, input_uri)
            if prior_images is not None:
                df = with_already_ingested(df, prior_images, prior_rejects)
            return df

        resolved = processed.transform(per_file).transform(with_duplicates_resolved)
        if prior_images is not None:
            resolved = resolved.transform(lambda df: with_prior_duplicates(df, prior_images))
        resolved = resolved.persist(StorageLevel.MEMORY_AND_DISK)
        persisted.append(resolved)

        t = time.perf_counter()
        set_job_description(spark, f"ingest: clean {files_seen} files")
        groups = (
            resolved.groupBy("reason", "split", "label")
            .agg(F.count(F.lit(1)).alias("n"),
                 F.sum(F.length("image")).alias("bytes"),
                 *[F.sum(c).alias(c) for c in _STAT_COLS],
                 F.sum("npix").alias("npix"))
            .collect()  # one row per (reason, split, label): bounded by classes, not by data
        )
        scanned = sum(g["n"] for g in groups)
        if scanned < files_seen:
            # Spark's scan skips zero-byte files: only now, and only when some are missing, the
            # listing is compared with the scanned paths (one path-only pass, no content read).
            log.info("ingest: %d listed files never reach the scan (0 bytes)", files_seen - scanned)
            unscanned = unscanned_files(spark, listed_files, raw).transform(per_file)
            unscanned = unscanned.select(*[F.col(c) if c in unscanned.columns else F.lit(None).cast(resolved.schema[c].dataType).alias(c)
                                           for c in resolved.columns]).persist(StorageLevel.MEMORY_AND_DISK)
            persisted.append(unscanned)
            groups = groups + unscanned.groupBy("reason", "split", "label").agg(
                F.count(F.lit(1)).alias("n"), F.lit(None).cast("long").alias("bytes"),
                *[F.lit(None).cast("double").alias(c) for c in _STAT_COLS], F.lit(None).cast("long").alias("npix"),
            ).collect()
            resolved = resolved.unionByName(unscanned)
        timings["clean_s"] = round(time.perf_counter() - t, 3)

        run_rejected: Dict[str, int] = {}
        run_splits: Dict[str, int] = {}
        run_classes: Dict[str, int] = {}
        new_bytes = 0
        stat_s, stat_q, stat_n = [0.0] * 3, [0.0] * 3, 0
        for g in groups:
            if g["reason"] is not None:
                run_rejected[g["reason"]] = run_rejected.get(g["reason"], 0) + g["n"]
                continue
            run_splits[g["split"]] = run_splits.get(g["split"], 0) + g["n"]
            if g["label"] is not None:
                run_classes[g["label"]] = run_classes.get(g["label"], 0) + g["n"]
            new_bytes += int(g["bytes"] or 0)
            if g["split"] == "train":
                stat_s = [a + float(g[f"s{i}"] or 0) for i, a in enumerate(stat_s)]
                stat_q = [a + float(g[f"q{i}"] or 0) for i, a in enumerate(stat_q)]
                stat_n += int(g["npix"] or 0)
        run_accepted = sum(run_splits.values())
        accounted = run_accepted + sum(run_rejected.values())
        log.info("ingest: cleaned %d files in %.1fs: %d accepted, rejected %s", accounted, timings["clean_s"],
                 run_accepted, dict(sorted(run_rejected.items())) or "none")
        if accounted != files_seen:
            raise InvariantError(f"ingest lost files: {files_seen} listed but {run_accepted} accepted + "
                                 f"{accounted - run_accepted} rejected = {accounted}; nothing was written")

        classes = class_mapping(prior.get("classes") if prior else None, run_classes, icfg)
        accepted_new = (
            resolved.filter(F.col("reason").isNull())
            .select(*[c for c in IMAGE_COLUMNS if c != "label_index"])
            .withColumn("label_index", _label_index_col(classes))
        )
        images = accepted_new.select(*IMAGE_COLUMNS)
        rejects = resolved.filter(F.col("reason").isNotNull() & (F.col("reason") != im.ALREADY_INGESTED)).select(*REJECT_COLUMNS)
        prior_splits = dict(prior["splits"]) if prior else {}
        prior_rejected = dict(prior["rejected"]) if prior else {}
        if prior is not None:
            images = images.unionByName(prior_images.select(*IMAGE_COLUMNS))
            rejects = rejects.unionByName(prior_rejects.select(*REJECT_COLUMNS))
        splits = _add(prior_splits, run_splits)
        rejected = _add(prior_rejected, {k: v for k, v in run_rejected.items() if k != im.ALREADY_INGESTED})
        class_counts = _add(dict(prior["class_counts"]) if prior else {}, run_classes)
        accepted = sum(splits.values())
        already = run_rejected.get(im.ALREADY_INGESTED, 0)
        total_seen = (int(prior["files_seen"]) if prior else 0) + files_seen - already
        total_bytes = new_bytes + (int(prior.get("image_bytes", 0)) if prior else 0)

        stats = _train_stats(prior, stat_s, stat_q, stat_n, opts.channels)
        n_train = splits.get("train", 0)
        need = 4 * icfg.max_train_procs
        tasks, rows_per_file = _plan_files(n_train, accepted, total_bytes, icfg, slots)
        if prior is None:
            # Already hash-partitioned by image_id (the duplicate window): classes are mixed, no reshuffle.
            to_write = images
        else:
            to_write = images.repartition(tasks, F.xxhash64(F.lit(icfg.seed), F.col("image_id")))

        # ---- load: staging, reconcile, commit ---------------------------------------------
        with atomic_output(spark, output_uri, commit_info={"stage": "ingest", "files_seen": total_seen}) as staging:
            t = time.perf_counter()
            set_job_description(spark, f"ingest: write {accepted} images")
            (
                to_write.withColumn("_rk", F.xxhash64(F.lit(icfg.seed), F.col("image_id")))
                .sortWithinPartitions(SPLIT_COLUMN, "_rk")  # shuffled within a split, same order every run
                .drop("_rk")
                .write.partitionBy(SPLIT_COLUMN)
                .option("maxRecordsPerFile", rows_per_file)
                .option("parquet.block.size", str(max(128, 2 * icfg.target_file_mb) * 1024 * 1024))
                .parquet(join(staging, IMAGES_DIR))
            )
            set_job_description(spark, "ingest: write rejects")
            (
                rejects.repartition(max(1, math.ceil(sum(rejected.values()) / 1_000_000)))
                .sortWithinPartitions("source_path")
                .write.parquet(join(staging, REJECTS_DIR))
            )
            timings["write_s"] = round(time.perf_counter() - t, 3)

            t = time.perf_counter()
            set_job_description(spark, "ingest: reconcile")
            split_dirs = {s: join(staging, IMAGES_DIR, f"{SPLIT_COLUMN}={s}") for s in _split_dirs(fs, join(staging, IMAGES_DIR))}
            counted = _footer_counts(spark, fs, [*split_dirs.values(), join(staging, REJECTS_DIR)])
            footers = {s: counted[d] for s, d in split_dirs.items()}
            written = {s: n for s, (_, n) in footers.items() if n}
            written_rejects = counted[join(staging, REJECTS_DIR)][1]
            check_invariant(total_seen, sum(written.values()), {"(written rejects)": written_rejects})
            if written != splits:
                raise InvariantError(f"images/ holds {written} rows per split, expected {splits}: nothing was committed")
            row_groups = {s: footers[s][0] for s in sorted(splits)}
            timings["reconcile_s"] = round(time.perf_counter() - t, 3)
            if 0 < n_train and row_groups.get("train", 0) < need:
                log.warning("ingest: train split has %d row groups (%d rows) < 4 x ingest.max_train_procs = %d: "
                            "training with that many processes will not get a shard each",
                            row_groups.get("train", 0), n_train, need)
            timings["total_s"] = round(time.perf_counter() - t0, 3)
            manifest = {
                "version": MANIFEST_VERSION,
                "input_uri": input_uri,
                "output_uri": output_uri,
                "files_seen": total_seen,
                "accepted": accepted,
                "rejected": dict(sorted(rejected.items())),
                "splits": dict(sorted(splits.items())),
                "class_counts": dict(sorted(class_counts.items())),
                "classes": classes,
                "image": _image_block(icfg),
                "val_carved_from_train": carve is not None,
                "image_bytes": total_bytes,
                "stats": stats,
                "row_groups": row_groups,
                "config": icfg.model_dump(mode="json"),
                "mode": mode,
                "run": {
                    "files_seen": files_seen, "accepted": run_accepted,
                    "rejected": dict(sorted(run_rejected.items())), "already_ingested": already,
                },
                "appends": (int(prior.get("appends", 0)) + 1) if prior else 0,
                "timings": timings,
                "images_per_second": round(files_seen / max(timings["total_s"], 1e-9), 2),
            }
            if prior is not None:
                manifest["input_uris"] = sorted(set(prior.get("input_uris", [prior["input_uri"]]) + [input_uri]))
            fs.write_json(join(staging, MANIFEST), manifest)
        log.info("ingest: committed %s: %d accepted, %d rejected, splits %s, %.0f files/s",
                 output_uri, accepted, sum(rejected.values()), manifest["splits"], manifest["images_per_second"])
        return {k: manifest[k] for k in ("files_seen", "accepted", "rejected", "splits", "class_counts", "classes",
                                         "row_groups", "images_per_second", "run", "timings")} | {"output": output_uri}
    finally:
        for df in persisted:
            df.unpersist()
        confs.close()


# --- DataFrame -> DataFrame transforms -------------------------------------------------

def _norm_source_col(c: Any) -> Any:
    from pyspark.sql import functions as F

    return F.regexp_replace(c, r"^file:/(?!/)", "file:///")


def layout_has_val(fs: HadoopFS, input_uri: str) -> bool:
    """Whether the input has a first-level ``val/`` or ``validation/`` folder (any case) holding a file
    Spark would read.

    Filesystem calls on the driver only (no Spark job, no content read): a glob for those names
    in the input's first level, then each such folder is walked until its first visible file
    (names starting with ``.``, or ``_`` without ``=``, are hidden from Spark's scan, so they do
    not count).
    """
    any_case = ",".join("".join(f"[{c.lower()}{c.upper()}]" for c in name) for name in ("val", "validation"))
    base = re.sub(r"([\\{}\[\]*?])", r"\\\1", input_uri)  # the input's own name is literal, not a glob
    return any(child.is_dir and fs.any_file(child.uri, skip=_hidden_from_spark)
               for child in fs.glob(join(base, "{" + any_case + "}")))


def _hidden_from_spark(name: str) -> bool:
    """Spark's file index skips these names (files and folders)."""
    return name.startswith(".") or (name.startswith("_") and "=" not in name) or name.endswith("._COPYING_")


def unscanned_files(spark: "SparkSession", listed_files: Any, raw: "DataFrame") -> "DataFrame":
    """Reject rows (``empty``) for files the file index lists but the scan never yields.

    Built in the JVM from the index's own array (nothing crosses to Python); the index
    gives URI-encoded paths, decoded here (``+`` is literal in a URI path, so it is kept).
    """
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    jvm = spark.sparkContext._jvm  # noqa: SLF001
    jds = spark._jsparkSession.createDataset(  # noqa: SLF001
        jvm.scala.collection.immutable.ArraySeq.unsafeWrapArray(listed_files), jvm.org.apache.spark.sql.Encoders.STRING())
    listed = DataFrame(jds.toDF(), spark).select(
        _norm_source_col(F.expr("reflect('java.net.URLDecoder', 'decode', replace(value, '+', '%2B'), 'UTF-8')"))
        .alias("source_path"))
    scanned = raw.select(_norm_source_col(F.col("path")).alias("source_path"))
    return listed.join(scanned, "source_path", how="left_anti").select(
        "source_path",
        F.lit(im.image_id(b"")).alias("image_id"),
        F.lit(None).cast("string").alias("label"),
        F.lit(None).cast("string").alias("split"),
        F.lit(im.EMPTY).alias("reason"),
        F.lit("file has 0 bytes").alias("detail"),
    )


def with_manifest_labels(spark: "SparkSession", df: "DataFrame", manifest_uri: str, input_uri: str) -> "DataFrame":
    """Labels from a ``path,label`` CSV; paths relative to the input or absolute URIs. Unlisted files -> ``no_label``."""
    from pyspark.sql import functions as F

    manifest_uri = to_uri(manifest_uri)
    m = spark.read.option("header", "true").schema("path string, label string").csv(manifest_uri)
    base = input_uri.rstrip("/") + "/"
    m = (
        m.filter(F.col("path").isNotNull() & (F.trim("path") != ""))
        .select(
            F.when(F.col("path").rlike(r"^[A-Za-z][A-Za-z0-9+.\-]*:/"), _norm_source_col(F.col("path")))
            .otherwise(F.concat(F.lit(base), F.regexp_replace(F.col("path"), r"^/+", "")))
            .alias("_m_path"),
            F.col("label").alias("_m_label"),
        )
        .dropDuplicates(["_m_path"])
    )
    joined = df.join(m, df["source_path"] == m["_m_path"], how="left")
    no_label = F.col("reason").isNull() & (F.col("_m_label").isNull() | (F.trim("_m_label") == ""))
    return joined.select(
        *[c for c in df.columns if c not in ("label", "reason", "detail")],
        F.col("_m_label").alias("label"),
        F.when(no_label, F.lit(im.NO_LABEL)).otherwise(F.col("reason")).alias("reason"),
        F.when(no_label, F.lit(f"file has no label in {manifest_uri}")).otherwise(F.col("detail")).alias("detail"),
    ).select(*df.columns)


def with_already_ingested(df: "DataFrame", prior_images: "DataFrame", prior_rejects: "DataFrame") -> "DataFrame":
    """Mark files the output already accounts for (same path, same bytes) as ``already_ingested``."""
    from pyspark.sql import functions as F

    known = (
        prior_images.select("source_path", "image_id")
        .unionByName(prior_rejects.select("source_path", "image_id"))
        .dropDuplicates()
        .select(F.col("source_path").alias("_k_path"), F.col("image_id").alias("_k_id"), F.lit(True).alias("_known"))
    )
    cond = (df["source_path"] == known["_k_path"]) & df["image_id"].eqNullSafe(known["_k_id"])
    j = df.join(known, cond, how="left")
    hit = F.col("_known").isNotNull()
    return j.select(
        *[c for c in df.columns if c not in ("reason", "detail")],
        F.when(hit, F.lit(im.ALREADY_INGESTED)).otherwise(F.col("reason")).alias("reason"),
        F.when(hit, F.lit("same path and bytes are already in the output")).otherwise(F.col("detail")).alias("detail"),
    ).select(*df.columns)


def with_duplicates_resolved(df: "DataFrame") -> "DataFrame":
    """Among accepted candidates with the same ``image_id``: keep the smallest ``source_path``.

    Copies with different labels are all rejected as ``label_conflict``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    cand = F.col("reason").isNull()
    w = Window.partitionBy("image_id")
    key = F.when(cand, F.col("source_path"))
    lab = F.when(cand, F.coalesce(F.col("label"), F.lit("\u0000")))
    j = (
        df.withColumn("_kept", F.min(key).over(w))
        .withColumn("_labels", F.array_sort(F.collect_set(lab).over(w)))
    )
    conflict = cand & (F.size("_labels") > 1)
    dup = cand & ~conflict & (F.col("source_path") != F.col("_kept"))
    reason = (F.when(conflict, F.lit(im.LABEL_CONFLICT)).when(dup, F.lit(im.DUPLICATE)).otherwise(F.col("reason")))
    detail = (
        F.when(conflict, F.concat(F.lit("same bytes carry labels "), F.array_join("_labels", ", ")))
        .when(dup, F.concat(F.lit("duplicate of "), F.col("_kept")))
        .otherwise(F.col("detail"))
    )
    return _with_reject(j, reason, detail).select(*df.columns)


def with_prior_duplicates(df: "DataFrame", prior_images: "DataFrame") -> "DataFrame":
    """On append: a new copy of an already stored image is a ``duplicate`` (same label) or ``label_conflict``."""
    from pyspark.sql import functions as F

    p = prior_images.select(F.col("image_id").alias("_p_id"), F.col("label").alias("_p_label"),
                            F.col("source_path").alias("_p_path"))
    j = df.join(p, df["image_id"] == p["_p_id"], how="left")
    hit = F.col("reason").isNull() & F.col("_p_id").isNotNull()
    same = F.col("label").eqNullSafe(F.col("_p_label"))
    reason = F.when(hit & same, F.lit(im.DUPLICATE)).when(hit, F.lit(im.LABEL_CONFLICT)).otherwise(F.col("reason"))
    detail = (
        F.when(hit & same, F.concat(F.lit("duplicate of "), F.col("_p_path")))
        .when(hit, F.concat(F.lit("label conflicts with "), F.coalesce(F.col("_p_label"), F.lit("(none)")),
                            F.lit(" of "), F.col("_p_path")))
        .otherwise(F.col("detail"))
    )
    return _with_reject(j, reason, detail).select(*df.columns)


def _with_reject(df: "DataFrame", reason: Any, detail: Any) -> "DataFrame":
    """Set reason/detail; a rejected row drops its image bytes and stats (they are not stored)."""
    from pyspark.sql import functions as F

    out = df.withColumn("_reason", reason).withColumn("_detail", detail)
    cleared = {c: F.when(F.col("_reason").isNull(), F.col(c)) for c in ("image", *_STAT_COLS, "npix")}
    return (
        out.withColumns(cleared)
        .withColumn("reason", F.col("_reason"))
        .withColumn("detail", F.col("_detail"))
        .drop("_reason", "_detail")
    )


def _label_index_col(classes: Mapping[str, int]) -> Any:
    from pyspark.sql import functions as F

    if not classes:
        return F.lit(None).cast("int")
    pairs = []
    for k, v in sorted(classes.items()):
        pairs += [F.lit(k), F.lit(int(v))]
    return F.create_map(*pairs)[F.col("label")].cast("int")


# --- driver-side bookkeeping (small dicts only) -----------------------------------------

def class_mapping(prior: Optional[Mapping[str, int]], labels: Mapping[str, int], cfg: IngestConfig) -> Dict[str, int]:
    """Sorted labels -> index; on append existing indices are kept and new labels get the next ones.

    >>> class_mapping(None, {"dog": 3, "cat": 1}, IngestConfig())
    {'cat': 0, 'dog': 1}
    """
    if not prior:
        return {lab: i for i, lab in enumerate(sorted(labels))}
    new = sorted(set(labels) - set(prior))
    if new and not cfg.allow_new_classes:
        raise DataError(f"--mode append: new classes {new} are not in the existing output's classes "
                        f"{sorted(prior)}; pass --set ingest.allow_new_classes=true to add them")
    out = dict(prior)
    nxt = max(out.values(), default=-1) + 1
    for lab in new:
        out[lab] = nxt
        nxt += 1
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def check_invariant(files_seen: int, accepted: int, rejected: Mapping[str, int]) -> None:
    """Raise :class:`InvariantError` unless ``files_seen == accepted + sum(rejected)``.

    >>> check_invariant(3, 2, {"corrupt": 1})
    """
    total = accepted + sum(rejected.values())
    if files_seen != total:
        raise InvariantError(
            f"files_seen ({files_seen}) != accepted ({accepted}) + rejected ({sum(rejected.values())}) = {total}: "
            "files were lost or double counted; nothing was committed"
        )


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> Dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


def _image_block(icfg: IngestConfig) -> Dict[str, Any]:
    return {"height": icfg.height, "width": icfg.width, "channels": 3 if icfg.color_mode == "RGB" else 1,
            "color_mode": icfg.color_mode, "format": icfg.encode_format}


def _train_stats(prior: Optional[Mapping[str, Any]], s: List[float], q: List[float], n: int, channels: int) -> Dict[str, Any]:
    s, q = s[:channels], q[:channels]
    s, q, n = _combine_stats((prior or {}).get("stats"), s, q, n, channels)
    out = im.channel_mean_std(s, q, n)
    return {**out, "pixels": n, "split": "train"}

"""Extract: list the input through Spark's ``binaryFile`` source and clean every file on executors.

* :func:`list_input` - the file index's listing (the witness for the accounting invariant)
  and the listed bytes, without a Spark job;
* :func:`scan_confs` - the scan's session confs, sized from the listing;
* :func:`clean_batches` - the per-image ``mapInPandas`` function (hash, place, clean);
* :func:`scanned` - the files read and cleaned (files above ``ingest.max_file_mb`` never read);
* :func:`too_large_files` and :func:`unscanned_files` - reject rows for the files the scan
  does not clean (too large) or never yields (zero bytes);
* :func:`listed_files` - each listed file's path, modification time and size from the file
  index (nothing read), for an append's decision of what to read (:mod:`.unchanged`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import pandas as pd  # module level: mapInPandas functions are resolved against module globals

from pipeline import faults
from pipeline.imaging import clean as imc
from pipeline.imaging.reasons import EMPTY, FILE_TOO_LARGE, NO_LABEL
from pipeline.ingest import layout

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame, SparkSession

log = logging.getLogger(__name__)

#: Output of the per-image step (one row per file): the stored columns plus bookkeeping.
PROCESSED_DDL = (
    "source_path string, image_id string, label string, split string, reason string, detail string, "
    "image binary, height int, width int, channels int, format string, "
    "s0 double, s1 double, s2 double, q0 double, q1 double, q2 double, npix long, "
    "phash long, quality_flags array<string>, split_source string"
)
STAT_COLS = ("s0", "s1", "s2", "q0", "q1", "q2")
COLUMNS = tuple(c.split()[0] for c in PROCESSED_DDL.split(", "))
_IMAGE_ONLY = ("image", "height", "width", "channels", "format", *STAT_COLS, "npix", "phash", "quality_flags")


@dataclass(frozen=True)
class Listing:
    """What Spark's file index found under the input (listed on the driver, nothing read yet)."""

    raw: "DataFrame"  #: the ``binaryFile`` DataFrame (path, length, content, ...)
    files: Any  #: the index's JVM array of file URIs: only its length crosses py4j
    files_seen: int
    input_bytes: int


def list_input(spark: "SparkSession", input_uri: str) -> Listing:
    """List ``input_uri`` recursively through ``binaryFile`` (no glob filter: every file is counted).

    The file index's listing is the witness for the invariant. Spark's scan silently skips
    zero-byte files, so they are found later by comparing the listing with what the scan yields.
    """
    raw = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(input_uri)
    files = raw._jdf.inputFiles()  # noqa: SLF001 - a JVM array: only its length crosses py4j
    # Total bytes from the same index (no Spark job): it sizes the scan's tasks before any scan runs.
    return Listing(raw, files, len(files), listed_bytes(raw))


def listed_bytes(raw: "DataFrame") -> int:
    """Sum of the listed files' lengths, from the file index Spark already built (driver only, no job)."""
    try:
        # A Scala BigInt: py4j hands it over as a Python int (str() covers a JavaObject too).
        return int(str(raw._jdf.queryExecution().optimizedPlan().stats().sizeInBytes()))  # noqa: SLF001
    except Exception:  # pragma: no cover - API drift: fall back to a length-only pass
        log.warning("ingest: the file index gave no size; summing file lengths with a Spark job")
        from pyspark.sql import functions as F

        return int(raw.agg(F.sum("length")).first()[0] or 0)


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


# --- the per-image step on executors ------------------------------------------------

def clean_batches(
    opts: imc.ImageOptions,
    *,
    root_uri: str,
    label_source: str,
    fractions: Mapping[str, float],
    seed: int,
    carve: Optional[Mapping[str, float]] = None,
    fault: Optional[faults.FaultPlan] = None,
    counter: Any = None,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The ``mapInPandas`` function: ``(path, content)`` batches -> :data:`PROCESSED_DDL` batches.

    ``fault`` is the driver's :func:`pipeline.faults.armed` plan (tests only), carried in the closure;
    ``counter`` an accumulator each batch adds its file count to (progress, :func:`pipeline.spark.progress`).
    """
    where = dict(root_uri=root_uri, label_source=label_source, fractions=dict(fractions), seed=seed, carve=carve)
    return per_file_batches(lambda pdf: zip(pdf["path"].tolist(), pdf["content"].tolist()),
                            lambda path, content: clean_one(path, content, opts, label_source, where),
                            fault=fault, counter=counter)


def per_file_batches(
    items: Callable[[pd.DataFrame], Iterable[Tuple[Any, ...]]],
    row: Callable[..., Dict[str, Any]],
    *,
    fault: Optional[faults.FaultPlan],
    counter: Any,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The ``mapInPandas`` loop every reader of the input shares: each batch's ``items(pdf)``, each
    made a :data:`PROCESSED_DDL` row by ``row(*item)``, as one frame per batch.

    Also the ``ingest.batch`` fault point (``drop_row`` drops the batch's first item unread) and
    the progress accumulator ``counter`` (each batch adds its row count), when given.
    """

    def fn(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            drop = faults.fire(fault, "ingest.batch")
            rows: Dict[str, List[Any]] = {c: [] for c in COLUMNS}
            for item in items(pdf):
                if drop:
                    drop = False
                    continue
                for k, v in row(*item).items():
                    rows[k].append(v)
            if counter is not None:
                counter.add(len(pdf))
            yield frame(rows)

    return fn


def clean_one(path: str, content: Optional[bytes], opts: imc.ImageOptions, label_source: str,
              where: Mapping[str, Any], *, label: Optional[str] = None, split: Optional[str] = None) -> Dict[str, Any]:
    """One file's :data:`PROCESSED_DDL` row (image columns None for a reject).

    ``label`` / ``split`` (a path manifest's columns) win over the folder layout's: a given
    split counts as a split folder (near-duplicate handling never moves it).
    """
    data = bytes(content) if content is not None else b""
    iid = imc.image_id(data)
    placed_split, placed_label, source = layout.placement(path, iid, **where)
    if split is not None:
        placed_split, source = split, "folder"
    if label is not None:
        placed_label = label
    res = imc.clean_image(data, path, opts)
    if isinstance(res, imc.Cleaned) and label_source == "folders" and placed_label is None:
        res = imc.Rejected(NO_LABEL, "file is not inside a class folder (<input>/[<split>/]<label>/...)")
    row: Dict[str, Any] = {"source_path": layout.normalize_source(path), "image_id": iid, "label": placed_label,
                           "split": placed_split, "split_source": source}
    if not isinstance(res, imc.Cleaned):
        return {**row, "reason": res.reason, "detail": res.detail[:1000], **dict.fromkeys(_IMAGE_ONLY)}
    sums = list(res.pixel_sum) + [None] * (3 - len(res.pixel_sum))
    sqs = list(res.pixel_sumsq) + [None] * (3 - len(res.pixel_sumsq))
    return {**row, "reason": None, "detail": None, "image": res.image, "height": res.height, "width": res.width,
            "channels": res.channels, "format": res.format, **dict(zip(STAT_COLS, sums + sqs)),
            "npix": res.pixel_count, "phash": res.phash, "quality_flags": list(res.flags)}


def reject_row(path: str, image_id: Optional[str], reason: str, detail: str) -> Dict[str, Any]:
    """A :data:`PROCESSED_DDL` row for a file rejected without being cleaned (not placed: no split, no label)."""
    return {"source_path": layout.normalize_source(path), "image_id": image_id, "label": None, "split": None,
            "split_source": None, "reason": reason, "detail": detail[:1000], **dict.fromkeys(_IMAGE_ONLY)}


def frame(rows: Mapping[str, List[Any]]) -> pd.DataFrame:
    """The batch's rows as a pandas frame whose dtypes match :data:`PROCESSED_DDL` (nullable ints)."""
    return pd.DataFrame({
        **{k: rows[k] for k in ("source_path", "image_id", "label", "split", "reason", "detail", "image")},
        **{k: pd.array(rows[k], dtype="Int32") for k in ("height", "width", "channels")},
        "format": rows["format"],
        **{k: pd.array(rows[k], dtype="Float64") for k in STAT_COLS},
        "npix": pd.array(rows["npix"], dtype="Int64"),
        "phash": pd.array(rows["phash"], dtype="Int64"),
        "quality_flags": rows["quality_flags"],
        "split_source": rows["split_source"],
    })


# --- DataFrames of the listed files ---------------------------------------------------

def norm_source_col(c: "Column") -> "Column":
    """:func:`pipeline.ingest.layout.normalize_source` as a Column expression."""
    from pyspark.sql import functions as F

    return F.regexp_replace(c, r"^file:/(?!/)", "file:///")


def decoded_source_col(c: "Column") -> "Column":
    """A URI-encoded path (the file index's form) as a ``source_path`` (``+`` is literal in a URI path)."""
    from pyspark.sql import functions as F

    return norm_source_col(F.call_function("reflect", F.lit("java.net.URLDecoder"), F.lit("decode"),
                                           F.replace(c, F.lit("+"), F.lit("%2B")), F.lit("UTF-8")))


def listed_files(raw: "DataFrame") -> "DataFrame":
    """One row per listed non-empty file: ``file_path`` (the encoded form the scan's pushed filters
    compare), ``source_path``, ``mtime`` and ``size``, all from the file index's own listing."""
    from pyspark.sql import functions as F

    return raw.select(
        F.col("_metadata.file_path").alias("file_path"),
        decoded_source_col(F.col("_metadata.file_path")).alias("source_path"),
        F.col("_metadata.file_modification_time").alias("mtime"),
        F.col("_metadata.file_size").alias("size"),
    )


def scanned(raw: "DataFrame", fn: Callable[..., Any], *, max_bytes: int) -> "DataFrame":
    """The files at most ``max_bytes`` long, read and cleaned by ``fn`` (:func:`clean_batches`)."""
    from pyspark.sql import functions as F

    return (
        raw.filter(F.col("length") <= max_bytes)  # pushed into the scan: big files are never read
        .select("path", "content")
        .mapInPandas(fn, PROCESSED_DDL)
    )


def too_large_files(raw: "DataFrame", *, max_file_mb: int, listed: Optional["DataFrame"] = None) -> "DataFrame":
    """Reject rows (``file_too_large``) for files above ``max_file_mb``, from their listed length
    (``listed``: a :func:`listed_files` frame already at hand, instead of a pass over ``raw``)."""
    from pyspark.sql import functions as F

    files = (raw.select(norm_source_col(F.col("path")).alias("source_path"), "length") if listed is None
             else listed.select("source_path", F.col("size").alias("length")))
    return (
        # Not pushed into the scan on purpose: a pushed filter that drops thousands of files in a
        # row makes Spark's FileScanRDD recurse once per skipped file (StackOverflowError seen
        # with 10,000 files per partition). Without content in the projection nothing is read.
        files
        .filter(F.greatest(F.col("length"), F.lit(0)) > max_file_mb * 1024 * 1024)
        .select(
            "source_path",
            F.lit(None).cast("string").alias("image_id"),
            F.lit(None).cast("string").alias("label"),
            F.lit(None).cast("string").alias("split"),
            F.lit(FILE_TOO_LARGE).alias("reason"),
            F.concat(F.lit("file has "), F.col("length").cast("string"),
                     F.lit(f" bytes > ingest.max_file_mb={max_file_mb} MiB")).alias("detail"),
        )
    )


def unscanned_files(spark: "SparkSession", listing: Listing, seen: Optional["DataFrame"] = None) -> "DataFrame":
    """Reject rows (``empty``) for files the file index lists but the scan never yields.

    Built in the JVM from the index's own array (nothing crosses to Python); the index
    gives URI-encoded paths, decoded here. ``seen`` (a ``source_path`` column of the
    non-empty files, e.g. from :func:`listed_files`) saves a path-only pass over the input.
    """
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    jvm = spark.sparkContext._jvm  # noqa: SLF001
    jds = spark._jsparkSession.createDataset(  # noqa: SLF001
        jvm.scala.collection.immutable.ArraySeq.unsafeWrapArray(listing.files), jvm.org.apache.spark.sql.Encoders.STRING())
    listed = DataFrame(jds.toDF(), spark).select(decoded_source_col(F.col("value")).alias("source_path"))
    scanned_paths = (seen if seen is not None
                     else listing.raw.select(norm_source_col(F.col("path")).alias("source_path")))
    return listed.join(scanned_paths, "source_path", how="left_anti").select(
        "source_path",
        F.lit(imc.image_id(b"")).alias("image_id"),
        F.lit(None).cast("string").alias("label"),
        F.lit(None).cast("string").alias("split"),
        F.lit(EMPTY).alias("reason"),
        F.lit("file has 0 bytes").alias("detail"),
    )

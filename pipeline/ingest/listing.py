"""Listing and reading the input on executors: the driver holds folder names, never a file status.

``ingest.listing: executors`` (and every ``--input-list`` ingest) replaces Spark's ``binaryFile``
file index, which keeps one status object per file on the driver before the first task starts:

* :func:`shards` - the first levels of the input tree are expanded by small Spark jobs (each task
  lists one folder's direct entries and returns only its subfolders' names) until there are
  enough folders to spread; the driver collects folder names only;
* :func:`list_files` - one task per folder (or per run of folders) lists it through
  :mod:`pipeline.fs` (``pyarrow.fs``: the same layer as every other stage): the expanded folders
  for their direct files, the frontier folders recursively. One row per visible file:
  :data:`LISTING_DDL`;
* :func:`from_list` - the same rows from a *path manifest* (Parquet or CSV of
  ``path[,label[,split]]``), read by executors;
* :func:`read_and_clean` - the per-file step over those rows: empty files, files above
  ``ingest.max_file_mb`` and files that cannot be read become reject rows without (or after a
  failed) read; every other file is read through :mod:`pipeline.fs` and cleaned as the
  ``binaryFile`` scan's files are (:func:`pipeline.ingest.extract.clean_one`). Exactly one
  :data:`~pipeline.ingest.extract.PROCESSED_DDL` row per listed row.

The listing is persisted and counted on executors: ``files_seen`` is that count, the witness
every later count is checked against. Names hidden from Spark's scan (``.x``, ``_x``) are hidden
here too, so both listings see the same files.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pandas as pd  # module level: mapInPandas functions are resolved against module globals

from pipeline import faults
from pipeline.errors import ConfigError
from pipeline.fs import ARROW_SCHEMES, ArrowFS, scheme_of
from pipeline.imaging import clean as imc
from pipeline.imaging.reasons import EMPTY, FILE_TOO_LARGE, UNREADABLE
from pipeline.ingest import extract, layout

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

#: One row per listed file. ``label``/``split`` come from a path manifest (null otherwise);
#: ``size``/``mtime`` from the listing (null for a manifest's rows: the read finds the size).
LISTING_DDL = "source_path string, size long, mtime timestamp, label string, split string"
#: Rows per pandas frame a listing task yields (a 10-million-file folder streams out in chunks).
_CHUNK = 20_000
#: Most listing tasks; more folders than this are listed in contiguous runs per task.
MAX_LIST_TASKS = 4096


def supported(uri: str) -> bool:
    """Whether executors can list and read ``uri`` (``pyarrow.fs`` opens its scheme)."""
    s = scheme_of(uri)
    return (s if s != "s3a" else "s3") in ARROW_SCHEMES


def check_supported(uri: str) -> None:
    if not supported(uri):
        raise ConfigError(f"ingest.listing=executors cannot open {scheme_of(uri)}:// on executors: use "
                          f"ingest.listing=spark, or one of {', '.join(s + '://' for s in ARROW_SCHEMES)}")


# --- on executors -------------------------------------------------------------------------

def _children(fs: ArrowFS, uri: str) -> Tuple[List[Any], List[str]]:
    """``(visible files' FileInfo with their URIs, visible subfolder URIs)`` of folder ``uri``."""
    import pyarrow.fs as pafs

    base = uri.rstrip("/")
    p = fs.arrow(uri)[1]
    files: List[Any] = []
    dirs: List[str] = []
    for i in fs.fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True)):
        if layout.hidden_from_spark(i.base_name):
            continue
        child = f"{base}/{i.base_name}"
        if i.type == pafs.FileType.Directory:
            dirs.append(child)
        elif i.type == pafs.FileType.File:
            files.append((child, i))
    return files, sorted(dirs)


def _subfolders_fn(folders: Sequence[str]) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """``mapInPandas`` over ``spark.range``: each id names a folder; yields its visible subfolders."""
    folders = list(folders)

    def fn(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        fs: Optional[ArrowFS] = None
        for pdf in batches:
            out: List[str] = []
            for i in pdf["id"].tolist():
                uri = folders[int(i)]
                fs = fs or ArrowFS(uri)
                out.extend(_children(fs, uri)[1])
            yield pd.DataFrame({"uri": out}, dtype=object)

    return fn


def _list_fn(units: Sequence[Tuple[str, bool]], per_task: int, counter: Any = None,
             ) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """``mapInPandas`` over ``spark.range``: id ``k`` lists ``units[k*per_task:(k+1)*per_task]``
    (``(folder, recursive)``); yields :data:`LISTING_DDL` frames of at most ``_CHUNK`` rows
    (their row counts added to the accumulator ``counter``, when given: progress)."""
    units = list(units)

    def frame(rows: List[Tuple[str, int, Any]]) -> pd.DataFrame:
        if counter is not None:
            counter.add(len(rows))
        return pd.DataFrame({
            "source_path": [r[0] for r in rows],
            "size": pd.array([r[1] for r in rows], dtype="Int64"),
            "mtime": pd.to_datetime([r[2] for r in rows], utc=True).tz_localize(None),
            "label": pd.Series([None] * len(rows), dtype=object),
            "split": pd.Series([None] * len(rows), dtype=object),
        })

    def fn(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        fs: Optional[ArrowFS] = None
        rows: List[Tuple[str, int, Any]] = []
        for pdf in batches:
            for k in pdf["id"].tolist():
                for folder, recursive in units[int(k) * per_task:(int(k) + 1) * per_task]:
                    fs = fs or ArrowFS(folder)
                    todo = [folder]
                    while todo:
                        files, dirs = _children(fs, todo.pop())
                        for uri, info in files:
                            rows.append((layout.normalize_source(uri), int(info.size or 0), info.mtime))
                            if len(rows) >= _CHUNK:
                                yield frame(rows)
                                rows = []
                        if recursive:
                            todo.extend(reversed(dirs))
        if rows:
            yield frame(rows)

    return fn


# --- on the driver --------------------------------------------------------------------------

def shards(spark: "SparkSession", root_uri: str, *, want: int, max_depth: int = 3,
           ) -> Tuple[List[str], List[str]]:
    """``(flat, deep)``: folders whose direct files a task lists, and folders a task lists whole.

    The root is expanded level by level (one small Spark job per level, folder names only)
    until there are at least ``want`` folders, ``max_depth`` levels were expanded, or no
    deeper folder exists.
    """
    flat: List[str] = []
    frontier = [root_uri]
    for _ in range(max_depth):
        if len(frontier) >= want:
            break
        n = len(frontier)
        sub = (spark.range(0, n, 1, min(n, MAX_LIST_TASKS))
               .mapInPandas(_subfolders_fn(frontier), "uri string").collect())
        flat.extend(frontier)
        frontier = sorted(r[0] for r in sub)
        if not frontier:
            break
    return flat, frontier


def list_files(spark: "SparkSession", root_uri: str, *, slots: int, counter: Any = None) -> Tuple["DataFrame", int]:
    """The listing frame (:data:`LISTING_DDL`, not yet run) and the number of folders it is spread over.

    ``counter``: an accumulator the listing tasks add their file counts to (progress)."""
    check_supported(root_uri)
    flat, deep = shards(spark, root_uri, want=4 * max(1, slots))
    units = [(f, False) for f in flat] + [(d, True) for d in deep]
    per_task = max(1, -(-len(units) // MAX_LIST_TASKS))
    tasks = -(-len(units) // per_task)
    log.info("ingest: listing on executors: %d folders expanded on the way, %d listed whole, in %d tasks",
             len(flat), len(deep), tasks)
    return spark.range(0, tasks, 1, tasks).mapInPandas(_list_fn(units, per_task, counter), LISTING_DDL), len(units)


def from_list(spark: "SparkSession", list_uri: str, root_uri: str) -> "DataFrame":
    """:data:`LISTING_DDL` rows from a path manifest: Parquet (a file or folder) or CSV with a header,
    columns ``path`` and optionally ``label``, ``split``. Relative paths are below ``root_uri``."""
    from pyspark.sql import functions as F

    check_supported(root_uri)
    reader = spark.read.option("header", "true").csv if list_uri.lower().endswith(".csv") else spark.read.parquet
    try:
        df = reader(list_uri)
    except Exception as e:  # noqa: BLE001 - Spark's AnalysisException: bad or missing list
        raise ConfigError(f"--input-list {list_uri}: cannot read it ({str(e).splitlines()[0][:200]}); pass a "
                          "Parquet file/folder or a .csv with a header row and a 'path' column") from None
    cols = {c.lower(): c for c in df.columns}
    if "path" not in cols:
        raise ConfigError(f"--input-list {list_uri} has no 'path' column (columns: {', '.join(df.columns)}): "
                          "name the column holding the file paths 'path'")
    path = F.trim(F.col(cols["path"]).cast("string"))
    base = root_uri.rstrip("/") + "/"
    uri = (F.when(path.rlike(r"^[A-Za-z][A-Za-z0-9+.\-]+:"), path)
           .when(path.startswith("/"), F.concat(F.lit(base.split("://", 1)[0] + "://"), path)
                 if scheme_of(root_uri) == "file" else F.concat(F.lit(_authority(root_uri)), path))
           .otherwise(F.concat(F.lit(base), path)))

    def opt(name: str) -> Any:
        if name not in cols:
            return F.lit(None).cast("string")
        v = F.trim(F.col(cols[name]).cast("string"))
        return F.when(v != "", v)

    split = opt("split")
    split = F.coalesce(*[F.when(F.lower(split) == k, F.lit(v)) for k, v in layout.LAYOUT_SPLITS.items()],
                       F.when(split.isNotNull(), F.lower(split)))
    return df.select(extract.norm_source_col(uri).alias("source_path"), F.lit(None).cast("long").alias("size"),
                     F.lit(None).cast("timestamp").alias("mtime"), opt("label").alias("label"),
                     split.alias("split"))


def read_tasks(files: int, input_bytes: int, slots: int) -> int:
    """Tasks of the read-and-clean step: about 2 per slot, more for large inputs (<= 128 MiB or
    50,000 files each: a retried task redoes little)."""
    return max(2 * max(1, slots), math.ceil(input_bytes / (128 * 1024 * 1024)), math.ceil(files / 50_000))


def _authority(uri: str) -> str:
    """``hdfs://nn:8020/x`` -> ``hdfs://nn:8020`` (what an absolute path in a manifest is joined to)."""
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


@dataclass(frozen=True)
class Counted:
    """The listing's totals, counted on executors."""

    files: int
    bytes: int
    bad_splits: int  #: manifest rows whose ``split`` is none of train/val/test


def count(listed: "DataFrame") -> Counted:
    from pyspark.sql import functions as F

    r = listed.agg(F.count(F.lit(1)).alias("n"), F.coalesce(F.sum("size"), F.lit(0)).alias("b"),
                   F.count(F.when(~F.col("split").isin(*layout.SPLIT_ORDER), 1)).alias("bad")).first()
    return Counted(int(r["n"]), int(r["b"]), int(r["bad"]))


# --- reading and cleaning on executors ----------------------------------------------------

def read_and_clean(
    opts: imc.ImageOptions,
    *,
    max_bytes: int,
    root_uri: str,
    label_source: str,
    fractions: Mapping[str, float],
    seed: int,
    carve: Optional[Mapping[str, float]] = None,
    fault: Optional[faults.FaultPlan] = None,
    counter: Any = None,
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The ``mapInPandas`` function: :data:`LISTING_DDL` batches -> ``PROCESSED_DDL`` batches, one row each
    (each batch's row count added to the accumulator ``counter``, when given: progress)."""
    where = dict(root_uri=root_uri, label_source=label_source, fractions=dict(fractions), seed=seed, carve=carve)
    empty_id = imc.image_id(b"")
    fs: Dict[str, ArrowFS] = {}  # per scheme, filled on the executor

    def row(path: str, size: Any, label: Any, split: Any) -> Dict[str, Any]:
        rejected, data = _fetch(fs, path, None if pd.isna(size) else int(size), max_bytes, empty_id)
        return rejected if rejected is not None else extract.clean_one(
            path, data, opts, label_source, where, label=_str(label), split=_str(split))

    return extract.per_file_batches(
        lambda pdf: zip(pdf["source_path"].tolist(), pdf["size"].tolist(), pdf["label"].tolist(),
                        pdf["split"].tolist()),
        row, fault=fault, counter=counter)


def _fetch(fs: Dict[str, ArrowFS], path: str, size: Optional[int], max_bytes: int,
           empty_id: str) -> Tuple[Optional[Dict[str, Any]], bytes]:
    """``(reject row, b"")`` for a file not to clean (empty, too large, unreadable), else ``(None, bytes)``.

    A file above ``max_bytes`` is opened (its size, for a manifest's rows) but never read.
    """
    try:
        scheme = path.split("://", 1)[0]
        f = fs.get(scheme) or fs.setdefault(scheme, ArrowFS(path))
        pa_fs, p = f.arrow(path)
        with pa_fs.open_input_file(p) as h:
            n = size if size is not None else h.size()
            if n > max_bytes:
                return extract.reject_row(path, None, FILE_TOO_LARGE, f"file has {n} bytes > "
                                          f"ingest.max_file_mb={max_bytes // (1024 * 1024)} MiB"), b""
            data = h.read() if n else b""
    except Exception as e:  # noqa: BLE001 - missing, unreadable or vanished file: a reject, not a crash
        first = str(e).splitlines()[0][:300] if str(e) else ""
        return extract.reject_row(path, None, UNREADABLE, f"{type(e).__name__}: {first}".rstrip(": ")), b""
    if not data:
        return extract.reject_row(path, empty_id, EMPTY, "file has 0 bytes"), b""
    return None, bytes(data)


def _str(v: Any) -> Optional[str]:
    return None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)

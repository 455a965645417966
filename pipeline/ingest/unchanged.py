"""On append: the files the output already holds, decided from the listing alone (their bytes never read).

A file is **unchanged** when its path is stored in the output (an image or a reject row) and
its modification time is older than the previous ingest of the same input started listing,
by more than ``ingest.unchanged_margin_s`` (clock skew between the driver and the storage).
Every file modified since that listing was read by that ingest or is read by this one, so
an unchanged file's bytes are the ones the output already accounts for. It is counted
``already_ingested`` without being opened; the scan reads only the other files, pruned
in Spark's file index by a filter on ``_metadata`` (modification time at or after the
cutoff, or a path not stored yet): no task opens a skipped file. Unchanged files are only
counted (``already_ingested`` rows are never written, read or not).

Not covered (the file's bytes would be needed): a file replaced at a stored path by one
whose modification time predates the previous listing (``cp -p``, ``rsync -t``, ``tar x``
of an older copy). ``ingest.skip_unchanged=false`` reads every file, as a full ingest does.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from pipeline.config import IngestConfig

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import Column, DataFrame

log = logging.getLogger(__name__)

#: Most not-yet-stored paths the scan's pushed filter names one by one; with more, every file is read.
MAX_NAMED_PATHS = 200_000


@dataclass(frozen=True)
class Plan:
    """What an append reads (the pushed filter) and what it counts without reading."""

    pushed: Optional["Column"]  #: the scan's file filter (``_metadata`` only: evaluated in the file index)
    listed: "DataFrame"  #: ``source_path`` and ``size`` of every listed non-empty file (persisted)
    files: int  #: files the scan reads
    bytes: int  #: their bytes
    unchanged: int  #: files counted ``already_ingested`` without being read (no row: only counted)
    #: A listing on executors (``named=False``): its rows of the files to read or to reject on their size.
    to_read: Optional["DataFrame"] = None


def listed_at(now: Optional[dt.datetime] = None) -> str:
    """The listing's start time as stored in the manifest (``listed_at``, per input URI): UTC ISO 8601."""
    return (now or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="milliseconds")


def cutoff(cfg: IngestConfig, prior_listed_at: Mapping[str, str], input_uri: str) -> Optional[dt.datetime]:
    """Files modified before this instant and stored in the output are unchanged; None: read every file.

    The previous listing of the same input is the one that counts: another input's listing says
    nothing about when this input's files were last read.
    """
    if not cfg.skip_unchanged or input_uri not in prior_listed_at:
        return None
    return dt.datetime.fromisoformat(prior_listed_at[input_uri]) - dt.timedelta(seconds=cfg.unchanged_margin_s)


def plan(listed: "DataFrame", stored_paths: "DataFrame", at: dt.datetime, *, max_bytes: int,
         persist: Callable[["DataFrame"], "DataFrame"], named: bool = True) -> Optional[Plan]:
    """Split the listing into files to read and unchanged files; None when the split saves nothing.

    ``listed`` is :func:`pipeline.ingest.extract.listed_files`; ``stored_paths`` the output's ``source_path``
    values (images and rejects); ``persist`` keeps the joined listing until the job ends (it is
    read by the counts, the path list, the too-large rejects and the zero-byte check).
    ``named=False`` (a listing on executors, :mod:`pipeline.ingest.listing`): no path crosses to the
    driver; the plan's ``to_read`` is the listing filtered to the files to read (and those too large).
    """
    from pyspark.sql import functions as F

    known = stored_paths.select("source_path").distinct().withColumn("_stored", F.lit(True))
    flagged = persist(listed.join(known, "source_path", "left")
                      .withColumn("_stored", F.coalesce("_stored", F.lit(False))))
    small = F.col("size") <= max_bytes
    fresh = small & ~F.col("_stored")
    read = small & (~F.col("_stored") | (F.col("mtime") >= F.lit(at)))
    keep = small & F.col("_stored") & (F.col("mtime") < F.lit(at))
    counts = flagged.agg(
        F.count(F.when(fresh, 1)).alias("fresh"), F.count(F.when(read & (F.col("size") > 0), 1)).alias("read"),
        F.count(F.when(keep, 1)).alias("keep"), F.coalesce(F.sum(F.when(read, F.col("size"))), F.lit(0)).alias("bytes"),
    ).first()
    n_fresh, n_read, skipped = int(counts["fresh"]), int(counts["read"]), int(counts["keep"])
    if skipped == 0:
        log.info("ingest: every listed file is new or modified since %s: reading all", at.isoformat())
        return None
    if not named:
        log.info("ingest: %d listed files unchanged since %s (not read); reading %d (%d not stored yet)",
                 skipped, at.isoformat(), n_read, n_fresh)
        return Plan(None, flagged.select("source_path", "size"), n_read, int(counts["bytes"]), skipped,
                    flagged.filter(read | ~small).drop("_stored", "file_path"))
    if n_fresh > MAX_NAMED_PATHS:
        log.info("ingest: %d files not stored yet (more than %d to name in the scan's filter): reading all",
                 n_fresh, MAX_NAMED_PATHS)
        return None
    paths = [r[0] for r in flagged.filter(fresh).select("file_path").collect()]
    pushed = F.col("_metadata.file_modification_time") >= F.lit(at)
    if paths:
        pushed = pushed | F.col("_metadata.file_path").isin(paths)
    log.info("ingest: %d listed files unchanged since %s (not read); reading %d (%d not stored yet)",
             skipped, at.isoformat(), n_read, n_fresh)
    return Plan(pushed, flagged.select("source_path", "size"), n_read, int(counts["bytes"]), skipped)


def reads(raw: "DataFrame", p: Optional[Plan]) -> "DataFrame":
    """The ``binaryFile`` frame the scan reads: pruned to the plan's files."""
    return raw if p is None else raw.filter(p.pushed)


def listing_of(p: Optional[Plan]) -> Optional["DataFrame"]:
    """The non-empty files' ``source_path`` (for the zero-byte check), when a plan listed them."""
    return None if p is None else p.listed.select("source_path")


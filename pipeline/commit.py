"""Committing a stage's output: staging folder, commit marker, replace.

A stage writes everything into a staging folder next to its output;
:func:`atomic_output` moves it into place only when the stage succeeded. A
committed output holds the marker :data:`pipeline.contracts.COMMIT_MARKER`; a
folder without it is debris of a crashed run and is cleaned up, never mixed in.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from typing import TYPE_CHECKING, Iterator, Literal, Optional

from pipeline.contracts import COMMIT_MARKER, STAGING_PREFIX
from pipeline.errors import OutputExistsError
from pipeline.fs import FileSystem, filesystem, join, parent_and_name

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

WriteMode = Literal["error", "overwrite", "append", "resume"]


def is_committed(fs: FileSystem, out_uri: str) -> bool:
    return fs.exists(join(out_uri, COMMIT_MARKER))


def clean_stale_staging(fs: FileSystem, out_uri: str) -> int:
    """Delete staging folders left by crashed runs writing ``out_uri``; returns how many."""
    parent, name = parent_and_name(out_uri)
    n = 0
    for child in fs.list(parent):
        if parent_and_name(child)[1].startswith(f"{STAGING_PREFIX}{name}-"):
            log.warning("removing debris of a crashed run: %s", child)
            fs.delete(child)
            n += 1
    return n


def check_output_mode(fs: FileSystem, out_uri: str, mode: WriteMode, *, flag: str = "--mode") -> bool:
    """Validate ``mode`` against what is at ``out_uri``; True when a committed output exists.

    An uncommitted folder at ``out_uri`` (a crashed non-atomic writer) is removed.
    """
    committed = is_committed(fs, out_uri)
    if fs.exists(out_uri) and not committed:
        log.warning("%s holds an incomplete write from a crashed run (no %s): removing it", out_uri, COMMIT_MARKER)
        fs.delete(out_uri)
    if committed and mode == "error":
        raise OutputExistsError(
            f"output {out_uri} already exists: pass {flag} overwrite to replace it"
            + (" or append to add new files" if flag == "--mode" else "")
        )
    return committed


@contextlib.contextmanager
def atomic_output(spark: Optional["SparkSession"], out_uri: str, *, commit_info: Optional[dict] = None) -> Iterator[str]:
    """Yield a staging URI; on success replace ``out_uri`` with it.

    On failure the staging folder is deleted and ``out_uri`` is untouched.
    """
    fs = filesystem(out_uri, spark)
    clean_stale_staging(fs, out_uri)
    parent, name = parent_and_name(out_uri)
    fs.mkdirs(parent)
    staging = join(parent, f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
    try:
        yield staging
        fs.write_json(join(staging, COMMIT_MARKER), commit_info or {})
        trash = None
        if fs.exists(out_uri):
            trash = join(parent, f"{STAGING_PREFIX}{name}-old-{uuid.uuid4().hex[:12]}")
            fs.rename(out_uri, trash)
        fs.rename(staging, out_uri)
        if trash:
            fs.delete(trash)
        log.info("committed %s", out_uri)
    except BaseException:
        fs.delete(staging)
        raise

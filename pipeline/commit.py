"""Committing a stage's output as a new version, and resolving the version a reader reads.

A stage writes everything into a fresh, never-reused version folder inside its output
(``<out>/_v/<version>-<writer>/``) and commits it by creating one snapshot file
(``<out>/_snapshots/<version>.json``, :mod:`pipeline.snapshots`). Nothing is renamed:
before the create the new files are invisible, after it they are the output. Readers call
:func:`resolve` once and read the folder it names (:attr:`Committed.root`), which holds
the same layout a stage always wrote (``_manifest.json``, ``images/``, ``predictions/`` ...).

Outputs of the earlier, unversioned layout (files at the root, marked
:data:`pipeline.contracts.COMMIT_MARKER`) still read as they are; the next versioned
write over one migrates it (its files are removed once ``retain`` newer versions exist).
docs/contracts.md describes the protocol and what a crash at each step leaves.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Literal, Optional

from pipeline import faults
from pipeline.contracts import COMMIT_MARKER, STAGING_PREFIX
from pipeline.errors import DataError, OutputExistsError
from pipeline.fs import FileSystem, filesystem, join, parent_and_name, to_uri
from pipeline.snapshots import (SNAPSHOTS_DIR, VERSIONS_DIR, ConcurrentCommitError, DataFile, Snapshot, VersionedOutput,
                                VersionWriter)

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

WriteMode = Literal["error", "overwrite", "append", "resume"]

#: ``<out>/_v/<8 digits>-<12 hex>``: a version folder given directly (what :func:`resolve` returns).
_VERSION_ROOT_RE = re.compile(rf"^(.*)/{VERSIONS_DIR}/(\d{{8}})-[0-9a-f]{{12}}$")


@dataclass(frozen=True)
class Committed:
    """One committed version of an output: where its files are and what its commit recorded."""

    uri: str                 #: the output as users name it
    root: str                #: the folder holding this version's files
    version: Optional[int]   #: None for an output of the earlier, unversioned layout
    info: Dict[str, Any] = field(default_factory=dict)
    files: tuple = ()        #: the snapshot's :class:`pipeline.snapshots.DataFile` entries

    def describe(self) -> Dict[str, Any]:
        """What a model card or a summary records about the data it read."""
        return {"uri": self.uri, "version": self.version, "root": self.root}


class UnknownLayoutError(DataError):
    """The folder exists but was not written by pixelmill (or is of a newer layout)."""


def committed(fs: FileSystem, uri: str, version: Optional[int] = None) -> Optional[Committed]:
    """The committed version of output ``uri`` (newest, or ``version``); None when nothing is committed.

    Raises :class:`DataError` for an unknown ``version`` and :class:`UnknownLayoutError` when
    ``uri`` holds files of no pixelmill layout.
    """
    uri = uri.rstrip("/")
    m = _VERSION_ROOT_RE.match(uri)
    if m:  # a version folder itself: valid only if its snapshot (one read) names it
        try:
            out = _from_snapshot(m.group(1), VersionedOutput(fs, m.group(1)).read(int(m.group(2))))
        except DataError:
            out = None  # that version was never committed, or was removed after retain_versions newer ones
        if out is None or out.root != uri:
            raise DataError(f"{uri} is not a committed version folder: pass the output folder {m.group(1)} instead")
        return out
    snap = VersionedOutput(fs, uri).snapshot(version)
    if snap is not None:
        return _from_snapshot(uri, snap)
    marker = join(uri, COMMIT_MARKER)
    if fs.exists(marker):
        try:
            info = fs.read_json(marker)
        except ValueError:
            info = {}
        return Committed(uri, uri, None, info if isinstance(info, dict) else {})
    if fs.exists(uri) and not fs.exists(join(uri, VERSIONS_DIR)) and not fs.exists(join(uri, SNAPSHOTS_DIR)) \
            and fs.any_file(uri):
        raise UnknownLayoutError(
            f"{uri} holds files but no {SNAPSHOTS_DIR}/ and no {COMMIT_MARKER}: it is not a pixelmill output "
            "(choose an empty or new folder, or pass the stage's --output)")
    return None


def _from_snapshot(uri: str, snap: Snapshot) -> Committed:
    return Committed(uri, join(uri, str(snap.info.get("root", ""))), snap.version, dict(snap.info), tuple(snap.files))


def resolve(fs: FileSystem, uri: str, version: Optional[int] = None, *, missing: str, uncommitted: str) -> Committed:
    """:func:`committed`, with a :class:`DataError` when the output is ``missing`` or nothing is committed."""
    if not fs.exists(uri):
        raise DataError(missing)
    try:
        out = committed(fs, uri, version)
    except UnknownLayoutError:
        out = None  # files, but no pixelmill commit: to a reader, as good as uncommitted
    if out is None:
        raise DataError(uncommitted)
    return out


def is_committed(fs: FileSystem, out_uri: str) -> bool:
    try:
        return committed(fs, out_uri) is not None
    except DataError:
        return False


def clean_stale_staging(fs: FileSystem, out_uri: str) -> int:
    """Tidy what writers of the earlier layout left next to ``out_uri``; returns how many folders.

    Those writers renamed the old output away, then the staging folder into place: a crash
    between the two left the only copy of the old output under the ``-old-`` name. It is
    renamed back when ``out_uri`` is absent, never deleted; other staging folders are debris.
    """
    parent, name = parent_and_name(out_uri)
    n = 0
    for child in fs.list(parent):
        child_name = parent_and_name(child)[1]
        if not child_name.startswith(f"{STAGING_PREFIX}{name}-"):
            continue
        if child_name.startswith(f"{STAGING_PREFIX}{name}-old-") and not fs.exists(out_uri) \
                and fs.exists(join(child, COMMIT_MARKER)):
            log.warning("restoring the output a crashed run had moved away: %s -> %s", child, out_uri)
            fs.rename(child, out_uri)
        else:
            log.warning("removing debris of a crashed run: %s", child)
            fs.delete(child)
        n += 1
    return n


def check_output_mode(fs: FileSystem, out_uri: str, mode: WriteMode, *, flag: str = "--mode") -> bool:
    """Validate ``mode`` against what is at ``out_uri``; True when a committed version exists."""
    clean_stale_staging(fs, out_uri)
    exists = committed(fs, out_uri) is not None
    if exists and mode == "error":
        raise OutputExistsError(
            f"output {out_uri} already exists: pass {flag} overwrite to replace it"
            + (" or append to add new files" if flag == "--mode" else "")
        )
    return exists


@dataclass
class Staged:
    """A version being written: files go under :attr:`uri`; :meth:`add` names what the snapshot lists."""

    writer: VersionWriter
    info: Dict[str, Any]
    files: List[DataFile] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return self.writer.data_uri

    @property
    def version(self) -> int:
        return self.writer.version

    def add(self, uri: str, rows: int, kind: str) -> None:
        """List ``uri`` (a file or folder of this version, or of an earlier one) with its row count."""
        self.files.append(DataFile(self.writer.rel(uri), int(rows), kind))


@contextlib.contextmanager
def versioned_output(spark: Optional["SparkSession"], out_uri: str, *, info: Optional[Dict[str, Any]] = None,
                     retain: int = 2) -> Iterator[Staged]:
    """Yield a fresh version folder; when the block succeeds, commit it with one snapshot create.

    ``info`` (the dict itself: what the block adds to it until it ends is recorded too) goes
    into the snapshot with the files :meth:`Staged.add` listed.
    On failure the folder is deleted and the output keeps its committed version. Versions
    beyond ``retain`` are removed after the commit (by this writer, never by a reader).
    Raises :class:`pipeline.snapshots.ConcurrentCommitError` when another writer committed
    the same version first (this run's files are deleted; the winner is intact).
    """
    fs = filesystem(out_uri, spark)
    out = VersionedOutput(fs, out_uri)
    writer = out.begin()
    staged = Staged(writer, info if info is not None else {})  # not a copy
    fs.mkdirs(writer.data_uri)
    try:
        yield staged
        writer.commit(staged.files, info={**staged.info, "root": writer.folder}, retain=retain,
                      fault=faults.armed())
    except BaseException as e:
        if _committed_by(out, writer.version, writer.folder):  # a failed prune keeps the commit
            raise
        fs.delete(writer.data_uri)
        if not fs.any_file(out.root):  # no snapshot, no marker, nothing: a first write that failed
            fs.delete(out.root)  # leaves no folder behind
        taken = [v for v in out.versions() if v >= writer.version]
        if taken and isinstance(e, Exception) and not isinstance(e, ConcurrentCommitError):
            # Another writer committed this version while this one wrote (and its prune removed
            # this writer's folder): that, not the I/O error it caused, is what the user needs.
            raise ConcurrentCommitError(
                f"another writer committed version {taken[0]} of {out.root} while this run wrote it: nothing of "
                "this run was committed; rerun to write the next version") from None
        raise
    log.info("committed %s version %d", out_uri, writer.version)


def _committed_by(out: VersionedOutput, version: int, folder: str) -> bool:
    """Whether snapshot ``version`` exists and names ``folder`` (this writer's commit went through)."""
    try:
        return out.read(version).info.get("root") == folder
    except DataError:
        return False


def version_root(uri: str, version: Optional[int] = None, *, spark: Optional["SparkSession"] = None) -> str:
    """The folder of the newest committed version of output ``uri`` (or ``version``): what to point
    another tool at (``spark.read.parquet(version_root(out) + "/predictions")``)."""
    uri = to_uri(uri)
    return resolve(filesystem(uri, spark), uri, version, missing=f"{uri} does not exist",
                   uncommitted=f"{uri} holds no committed version: run the stage that writes it").root

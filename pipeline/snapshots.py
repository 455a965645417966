"""Versioned outputs committed by creating one snapshot file: no directory renames.

Layout of a versioned output ``<out>/``::

    _v/<version>-<writer>/...          the data one writer wrote for one version (never reused)
    _snapshots/<version>.json          the commit: created once, exclusively; lists every data file

A writer puts its files under a fresh ``_v/<version>-<writer>/`` folder, then creates
``_snapshots/<version>.json`` with :meth:`FileSystem.create_exclusive` (an ``O_EXCL``
create locally, a create-if-absent on HDFS, one PUT on object stores). That single
create is the commit: before it the new data is invisible, after it the snapshot names
exactly the files that make up the version, with their row counts. Two writers racing
for the same version write into different folders; only one create succeeds, the other
raises :class:`ConcurrentCommitError` and its folder is debris that a later writer
removes. A reader resolves the newest snapshot (or a given version) once and reads only
the files it lists, so a version keeps reading the same bytes while a newer one commits.
Nothing is renamed, and nothing a retained snapshot lists is deleted: the writer removes
versions beyond ``retain`` after its own commit, never a reader.

A crash at any instant leaves the old version or the new one: before the create the new
files are unreferenced, after it they are complete (they were all written first).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set

from pipeline import faults
from pipeline.errors import DataError, PixelmillError
from pipeline.fs import FileSystem, join

log = logging.getLogger(__name__)

VERSIONS_DIR = "_v"
SNAPSHOTS_DIR = "_snapshots"
SNAPSHOT_FORMAT = 1
_SNAPSHOT_RE = re.compile(r"^(\d{8})\.json$")
_DATA_RE = re.compile(r"^(\d{8})-[0-9a-f]{12}$")


class ConcurrentCommitError(PixelmillError):
    """Another writer committed the same version first."""

    exit_code = 1


@dataclass(frozen=True)
class DataFile:
    """One data file of a version, relative to the output root."""

    path: str
    rows: int
    kind: str = "data"  # e.g. "images", "rejects", "predictions"


@dataclass(frozen=True)
class Snapshot:
    """What one committed version consists of."""

    version: int
    files: Sequence[DataFile]
    created_utc: str
    parent: Optional[int] = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def rows(self, kind: Optional[str] = None) -> int:
        return sum(f.rows for f in self.files if kind is None or f.kind == kind)

    def uris(self, root: str, kind: Optional[str] = None) -> List[str]:
        return [join(root, f.path) for f in self.files if kind is None or f.kind == kind]

    def to_json(self) -> Dict[str, Any]:
        return {"format": SNAPSHOT_FORMAT, "version": self.version, "parent": self.parent,
                "created_utc": self.created_utc, "info": dict(self.info),
                "files": [{"path": f.path, "rows": f.rows, "kind": f.kind} for f in self.files]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str) -> "Snapshot":
        try:
            if int(d["format"]) != SNAPSHOT_FORMAT:
                raise DataError(f"{where} has snapshot format {d['format']}, this pixelmill reads {SNAPSHOT_FORMAT}: "
                                "upgrade pixelmill")
            files = tuple(DataFile(str(f["path"]), int(f["rows"]), str(f.get("kind", "data"))) for f in d["files"])
            return cls(int(d["version"]), files, str(d["created_utc"]), d.get("parent"), dict(d.get("info") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where} is not a pixelmill snapshot ({e!r}): the output was modified by another tool") from None


def _vname(version: int) -> str:
    return f"{version:08d}"


class VersionedOutput:
    """The versions of one output root: resolve, write, commit, prune."""

    def __init__(self, fs: FileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    # --- reading -----------------------------------------------------------------
    def _numbers(self) -> List[int]:
        """Every snapshot file's version number, readable or not, oldest first."""
        out = []
        for e in self.fs.entries(join(self.root, SNAPSHOTS_DIR)):
            m = _SNAPSHOT_RE.match(e.name)
            if m and not e.is_dir:
                out.append(int(m.group(1)))
        return sorted(out)

    def read(self, version: int) -> Snapshot:
        """Snapshot ``version`` alone (one read); :class:`DataError` when it is absent or does not parse."""
        uri = join(self.root, SNAPSHOTS_DIR, f"{_vname(version)}.json")
        if not self.fs.exists(uri):
            raise DataError(f"{uri} does not exist")
        try:
            return Snapshot.from_json(json.loads(self.fs.read_bytes(uri)), uri)
        except ValueError as e:
            raise DataError(f"{uri} is not valid JSON ({e}): the output was modified by another tool") from None

    def _committed(self, numbers: Optional[List[int]] = None) -> Dict[int, Snapshot]:
        """Every snapshot that parses (of ``numbers``, default: all), by version, each read once. One
        that does not parse is not a commit (a writer died creating it on a store without atomic creates)."""
        out = {}
        for v in self._numbers() if numbers is None else numbers:
            try:
                out[v] = self.read(v)
            except DataError as e:
                log.warning("ignoring snapshot %d of %s: %s", v, self.root, e)
        return out

    def versions(self) -> List[int]:
        """Committed versions, oldest first."""
        return sorted(self._committed())

    def snapshot(self, version: Optional[int] = None) -> Optional[Snapshot]:
        """The snapshot of ``version`` (default: the newest); None when nothing is committed."""
        snaps = self._committed()
        if not snaps:
            if version is not None:
                raise DataError(f"{self.root} has no committed version: --data-version {version} does not exist")
            return None
        if version is None:
            return snaps[max(snaps)]
        if version not in snaps:
            raise DataError(f"{self.root} has no version {version} (committed: {', '.join(map(str, sorted(snaps)))}): "
                            "pass one of those to --data-version")
        return snaps[version]

    # --- writing -------------------------------------------------------------------
    def begin(self) -> "VersionWriter":
        """A writer of the next version, with its own never-reused data folder."""
        numbers = self._numbers()
        latest = sorted(self._committed(numbers))
        parent = latest[-1] if latest else None
        version = (numbers[-1] if numbers else 0) + 1  # never reuse a number, even an unreadable one
        folder = join(VERSIONS_DIR, f"{_vname(version)}-{uuid.uuid4().hex[:12]}")
        return VersionWriter(self, version, parent, folder)

    def prune(self, retain: int, *, fault: Optional[faults.FaultPlan] = None) -> List[str]:
        """Delete snapshots beyond the newest ``retain`` and every data folder no retained snapshot lists.

        Unlisted data folders numbered above the newest version may belong to writers still running:
        kept. Those numbered at or below it can never be committed (that number is taken) and go. An output of the earlier layout (files at the root, marked
        ``_PIXELMILL_COMMITTED``) counts as the oldest version: its files go once ``retain``
        snapshots exist, the marker first, so a half-deleted old layout never reads as committed.
        """
        snaps = self._committed()
        if not snaps:
            return []
        versions = sorted(snaps)
        newest = versions[-1]
        removed: List[str] = []
        if len(versions) >= retain:
            removed += self._remove_legacy()
        retained = versions[-max(1, retain):]
        referenced: Set[str] = set()
        for v in retained:
            paths = [f.path for f in snaps[v].files] + [str(snaps[v].info.get("root", ""))]  # the version's own folder
            referenced.update(p.split("/")[1] for p in paths if p.startswith(VERSIONS_DIR + "/"))
        # Snapshots first: a crash mid-prune leaves unlisted folders (debris), never a snapshot
        # naming deleted files.
        for v in [n for n in self._numbers() if n < retained[0]]:
            self.fs.delete(join(self.root, SNAPSHOTS_DIR, f"{_vname(v)}.json"))
            faults.fire(fault, "commit", step=3)
        for e in self.fs.entries(join(self.root, VERSIONS_DIR)):
            m = _DATA_RE.match(e.name)
            if not m or e.name in referenced or int(m.group(1)) > newest:
                continue
            self.fs.delete(e.uri)
            removed.append(e.uri)
        if removed:
            log.info("removed %d data folder(s) no retained snapshot of %s lists", len(removed), self.root)
        return removed

    def _remove_legacy(self) -> List[str]:
        """The files of the earlier, unversioned layout at the root (see :meth:`prune`)."""
        from pipeline.contracts import COMMIT_MARKER

        marker = join(self.root, COMMIT_MARKER)
        rest = [e for e in self.fs.entries(self.root) if e.name not in (VERSIONS_DIR, SNAPSHOTS_DIR, COMMIT_MARKER)]
        if not self.fs.exists(marker) and not rest:
            return []
        self.fs.delete(marker)
        for e in rest:
            self.fs.delete(e.uri)
        log.info("removed the earlier layout's files at %s (migrated to versions)", self.root)
        return [marker, *(e.uri for e in rest)]


@dataclass
class VersionWriter:
    """Writes one version: files go under :attr:`data_uri`; :meth:`commit` makes them visible."""

    output: VersionedOutput
    version: int
    parent: Optional[int]
    folder: str  # relative to the root

    @property
    def data_uri(self) -> str:
        return join(self.output.root, self.folder)

    def rel(self, uri: str) -> str:
        """``uri`` relative to the output root (what a snapshot stores)."""
        root = self.output.root + "/"
        if not uri.startswith(root):
            raise ValueError(f"{uri} is not inside {self.output.root}")
        return uri[len(root):]

    def commit(self, files: Sequence[DataFile], *, info: Optional[Mapping[str, Any]] = None,
               retain: int = 2, fault: Optional[faults.FaultPlan] = None) -> Snapshot:
        """Create the snapshot (the commit), then prune versions beyond ``retain``.

        Fault-injection steps (point ``commit``): 1 = data written, snapshot not created;
        2 = snapshot created, nothing pruned; 3 = after each snapshot file the prune deletes.
        """
        snap = Snapshot(self.version, tuple(files), _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        self.parent, dict(info or {}))
        uri = join(self.output.root, SNAPSHOTS_DIR, f"{_vname(self.version)}.json")
        faults.fire(fault, "commit", step=1)
        try:
            self.output.fs.create_exclusive(uri, (json.dumps(snap.to_json(), indent=2, sort_keys=True) + "\n").encode())
        except FileExistsError:
            raise ConcurrentCommitError(
                f"another writer committed version {self.version} of {self.output.root} first: nothing of this run "
                "was committed; rerun to write the next version") from None
        log.info("committed version %d of %s (%d files)", self.version, self.output.root, len(snap.files))
        faults.fire(fault, "commit", step=2)
        self.output.prune(retain, fault=fault)
        return snap

    def abort(self) -> None:
        """Delete this writer's data folder (nothing of it was committed)."""
        self.output.fs.delete(self.data_uri)

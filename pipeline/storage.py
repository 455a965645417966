"""URIs and atomic, idempotent outputs on any filesystem Spark can reach.

Every path is a URI with a scheme; local paths are made absolute
(``data/x`` -> ``file:///abs/data/x``). Driver-side file operations go through
Hadoop's FileSystem API (via the SparkSession's JVM), so the same code works on
``file://``, ``hdfs://``, ``s3a://`` and friends.

Outputs are committed atomically: a stage writes everything into a staging
folder next to the output and :func:`atomic_output` renames it into place only
when the stage succeeded. A committed output holds the marker file
``_PIXELMILL_COMMITTED``; a folder without it is debris of a crashed run and is
cleaned up, never mixed in.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Literal, NamedTuple, Optional
from urllib.parse import urlparse

from pipeline.errors import ConfigError, OutputExistsError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

COMMIT_MARKER = "_PIXELMILL_COMMITTED"
STAGING_PREFIX = "._pixelmill_staging-"
WriteMode = Literal["error", "overwrite", "append", "resume"]


def to_uri(path: str) -> str:
    """Make ``path`` a URI with a scheme; local paths become absolute ``file://`` URIs.

    >>> to_uri("/tmp/x")
    'file:///tmp/x'
    """
    if not path or not str(path).strip():
        raise ConfigError("empty path: pass a path or a URI such as file:///data/raw")
    path = str(path).strip()
    parsed = urlparse(path)
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" is not a scheme
        if parsed.scheme == "file":
            return "file://" + os.path.abspath(parsed.path)
        return path.rstrip("/") if len(path) > len(parsed.scheme) + 3 else path
    return "file://" + os.path.abspath(os.path.expanduser(path))


def local_path(uri: str) -> Optional[str]:
    """The local filesystem path of a ``file://`` URI, else None."""
    p = urlparse(uri)
    return p.path if p.scheme == "file" else None


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def parent_and_name(uri: str) -> tuple[str, str]:
    u = uri.rstrip("/")
    i = u.rfind("/")
    return u[:i], u[i + 1:]


class Entry(NamedTuple):
    """One file or folder, as :meth:`HadoopFS.glob` returns it."""

    name: str
    uri: str
    is_dir: bool


class HadoopFS:
    """A few driver-side filesystem operations through Hadoop's FileSystem API."""

    def __init__(self, spark: "SparkSession") -> None:
        self._jvm = spark.sparkContext._jvm  # noqa: SLF001
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()  # noqa: SLF001

    def _path(self, uri: str) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(uri)

    def _fs(self, uri: str) -> Any:
        return self._path(uri).getFileSystem(self._conf)

    def exists(self, uri: str) -> bool:
        return bool(self._fs(uri).exists(self._path(uri)))

    def is_dir(self, uri: str) -> bool:
        fs = self._fs(uri)
        p = self._path(uri)
        return bool(fs.exists(p) and fs.getFileStatus(p).isDirectory())

    def delete(self, uri: str) -> None:
        fs = self._fs(uri)
        p = self._path(uri)
        if fs.exists(p):
            fs.delete(p, True)

    def mkdirs(self, uri: str) -> None:
        self._fs(uri).mkdirs(self._path(uri))

    def rename(self, src: str, dst: str) -> None:
        fs = self._fs(src)
        if not fs.rename(self._path(src), self._path(dst)):
            raise OSError(f"rename {src} -> {dst} failed")

    def list(self, uri: str) -> List[str]:
        fs = self._fs(uri)
        p = self._path(uri)
        if not fs.exists(p):
            return []
        return sorted(str(s.getPath().toString()) for s in fs.listStatus(p))

    def glob(self, pattern: str) -> List[Entry]:
        """Entries matching a Hadoop glob (``{a,b}``, ``[vV]``, ``*``); matched in the JVM, only hits cross py4j."""
        found = self._fs(pattern).globStatus(self._path(pattern))
        if found is None:
            return []
        return sorted(Entry(str(st.getPath().getName()), str(st.getPath().toString()), bool(st.isDirectory()))
                      for st in found)

    def any_file(self, uri: str, *, skip: Callable[[str], bool] = lambda name: False) -> bool:
        """Whether the folder holds a file at any depth, not counting names (or folders) ``skip`` rejects.

        Depth-first, one listing per folder visited, stopping at the first such file: a folder
        of thousands of files costs one listing and a few py4j calls, not one per file.
        """
        todo = [uri]
        while todo:
            folder = todo.pop()
            statuses = self._fs(folder).listStatus(self._path(folder))
            subdirs = []
            for i in range(len(statuses)):
                st = statuses[i]
                if skip(str(st.getPath().getName())):
                    continue
                if not st.isDirectory():
                    return True
                subdirs.append(str(st.getPath().toString()))
            todo.extend(reversed(subdirs))
        return False

    def write_text(self, uri: str, text: str) -> None:
        fs = self._fs(uri)
        out = fs.create(self._path(uri), True)
        try:
            out.write(bytearray(text.encode("utf-8")))
        finally:
            out.close()

    def read_text(self, uri: str) -> str:
        fs = self._fs(uri)
        stream = fs.open(self._path(uri))
        try:
            reader = self._jvm.java.io.BufferedReader(self._jvm.java.io.InputStreamReader(stream, "UTF-8"))
            lines = []
            while True:
                line = reader.readLine()
                if line is None:
                    break
                lines.append(line)
            return "\n".join(lines)
        finally:
            stream.close()

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_text(uri))


def is_committed(fs: HadoopFS, out_uri: str) -> bool:
    return fs.exists(join(out_uri, COMMIT_MARKER))


def clean_stale_staging(fs: HadoopFS, out_uri: str) -> int:
    """Delete staging folders left by crashed runs writing ``out_uri``; returns how many."""
    parent, name = parent_and_name(out_uri)
    n = 0
    for child in fs.list(parent):
        if parent_and_name(child)[1].startswith(f"{STAGING_PREFIX}{name}-"):
            log.warning("removing debris of a crashed run: %s", child)
            fs.delete(child)
            n += 1
    return n


def check_output_mode(fs: HadoopFS, out_uri: str, mode: WriteMode, *, flag: str = "--mode") -> bool:
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
def atomic_output(spark: "SparkSession", out_uri: str, *, commit_info: Optional[dict] = None) -> Iterator[str]:
    """Yield a staging URI; on success replace ``out_uri`` with it in one rename.

    On failure the staging folder is deleted and ``out_uri`` is untouched.
    """
    fs = HadoopFS(spark)
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

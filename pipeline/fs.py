"""One filesystem interface for every stage, on the driver and on executors alike.

Every path is a URI with a scheme; local paths are made absolute
(``data/x`` -> ``file:///abs/data/x``) by :func:`to_uri`.

:func:`filesystem` returns a :class:`FileSystem` for a URI:

* :class:`ArrowFS` over ``pyarrow.fs`` for the schemes pyarrow opens itself
  (``file``, ``hdfs``/``viewfs``, ``s3``, ``gs``/``gcs``). It needs no JVM, so
  the same object works in Spark's Python workers and in the Horovod processes.
  ``s3a://`` (Hadoop's name for S3) is opened as ``s3://``.
* :class:`HadoopFS` over Hadoop's FileSystem API through the SparkSession's JVM,
  only for schemes that exist only there (``abfs``, ``wasb``, ``oss``, a custom
  ``fs.<scheme>.impl``, ...). It needs a session, so it serves the driver only.

Both offer the same operations; stages never open a private route to storage.
Single-file writes are atomic where the store allows it: the bytes go to a
temporary name next to the target, then one rename (object stores: one PUT).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any, Callable, List, NamedTuple, Optional, Tuple
from urllib.parse import urlparse, urlsplit

from pipeline.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: Schemes ``pyarrow.fs`` opens itself (after ``s3a`` -> ``s3``).
ARROW_SCHEMES = ("file", "hdfs", "viewfs", "s3", "gs", "gcs")


# --- URIs ------------------------------------------------------------------------

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
    p = _split(uri)
    return p.path if p.scheme == "file" else None


def _split(uri: str) -> Any:
    """``urlsplit`` without a query or fragment: ``?`` and ``#`` are legal in file names."""
    parts = urlsplit(uri, allow_fragments=False)
    return parts._replace(path=parts.path + ("?" + parts.query if "?" in uri else ""), query="")


def join(uri: str, *parts: str) -> str:
    """``join("file:///a/", "b", "c")`` -> ``'file:///a/b/c'``."""
    out = uri.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


def parent_and_name(uri: str) -> Tuple[str, str]:
    u = uri.rstrip("/")
    i = u.rfind("/")
    return u[:i], u[i + 1:]


def name_of(uri: str) -> str:
    return parent_and_name(uri)[1]


def is_under(child: str, parent: str) -> bool:
    """Whether ``child`` is ``parent`` or inside it (same scheme and authority)."""
    c, p = child.rstrip("/"), parent.rstrip("/")
    return c == p or c.startswith(p + "/")


def scheme_of(uri: str) -> str:
    return urlparse(uri).scheme.lower()


class Entry(NamedTuple):
    """One child of a folder, as :meth:`FileSystem.entries` returns it."""

    name: str
    uri: str
    is_dir: bool
    size: int


# --- the interface -------------------------------------------------------------------

class FileSystem:
    """The operations every stage uses. Subclasses implement the primitives."""

    # primitives ---------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        raise NotImplementedError

    def is_dir(self, uri: str) -> bool:
        raise NotImplementedError

    def entries(self, uri: str) -> List[Entry]:
        """The children of folder ``uri``, sorted by name (``[]`` when it does not exist)."""
        raise NotImplementedError

    def read_bytes(self, uri: str) -> bytes:
        raise NotImplementedError

    def _write(self, uri: str, data: bytes) -> None:
        """Create or replace ``uri`` with ``data`` (not atomic by itself)."""
        raise NotImplementedError

    def create_exclusive(self, uri: str, data: bytes) -> None:
        """Create ``uri`` holding ``data``; :class:`FileExistsError` when it already exists."""
        raise NotImplementedError

    def mkdirs(self, uri: str) -> None:
        raise NotImplementedError

    def delete(self, uri: str) -> None:
        """Delete a file or a folder with everything in it; nothing when absent."""
        raise NotImplementedError

    def rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    # derived ------------------------------------------------------------------------
    def list(self, uri: str) -> List[str]:
        """Child URIs of folder ``uri``, sorted (``[]`` when it does not exist)."""
        return [e.uri for e in self.entries(uri)]

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Replace ``uri`` atomically: a temporary name beside it, then one rename."""
        parent, name = parent_and_name(uri)
        self.mkdirs(parent)
        tmp = join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self._write(tmp, data)
        try:
            if self.exists(uri):
                self.delete(uri)
            self.rename(tmp, uri)
        except BaseException:
            self.delete(tmp)
            raise

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_text(uri))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def upload(self, local_file: str, uri: str) -> None:
        with open(local_file, "rb") as f:
            self.write_bytes(uri, f.read())

    def download(self, uri: str, local_file: str) -> None:
        """Copy ``uri`` to ``local_file`` atomically (a partial copy never has the final name)."""
        tmp = f"{local_file}.{os.getpid()}.part"
        with open(tmp, "wb") as f:
            f.write(self.read_bytes(uri))
        os.replace(tmp, local_file)

    def upload_tree(self, local_dir: str, uri: str) -> None:
        for dirpath, _, files in os.walk(local_dir):
            sub = os.path.relpath(dirpath, local_dir)
            for name in files:
                dest = join(uri, *([] if sub == "." else [sub]), name)
                self.upload(os.path.join(dirpath, name), dest)

    def parquet_counts(self, uri: str) -> Tuple[int, int]:
        """``(row groups, rows)`` of one Parquet file, from its footer only."""
        raise NotImplementedError

    def any_file(self, uri: str, *, skip: Callable[[str], bool] = lambda name: False) -> bool:
        """Whether the folder holds a file at any depth, not counting names (or folders) ``skip`` rejects.

        Depth-first, one listing per folder visited, stopping at the first such file.
        """
        todo = [uri]
        while todo:
            subdirs = []
            for e in self.entries(todo.pop()):
                if skip(e.name):
                    continue
                if not e.is_dir:
                    return True
                subdirs.append(e.uri)
            todo.extend(reversed(subdirs))
        return False


class ArrowFS(FileSystem):
    """:class:`FileSystem` over ``pyarrow.fs``: no JVM, so it works on executors and in Horovod processes.

    One instance serves one URI's filesystem (scheme and authority); paths of other URIs on the
    same store work too.
    """

    def __init__(self, uri: str) -> None:
        import pyarrow.fs as pafs

        self._pafs = pafs
        target = _arrow_uri(uri)
        try:
            self.fs, _ = pafs.FileSystem.from_uri(target)
        except Exception as e:  # noqa: BLE001 - any scheme or store pyarrow cannot open
            raise ConfigError(f"cannot open {uri} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                              f"use one of {', '.join(s + '://' for s in ARROW_SCHEMES)}") from None

    def _p(self, uri: str) -> str:
        p = _split(_arrow_uri(uri))
        if p.scheme in ("s3", "gs", "gcs"):
            return (p.netloc + p.path).rstrip("/")
        return (p.path or "/").rstrip("/") or "/"

    def _info(self, uri: str) -> Any:
        return self.fs.get_file_info(self._p(uri))

    def exists(self, uri: str) -> bool:
        return self._info(uri).type != self._pafs.FileType.NotFound

    def is_dir(self, uri: str) -> bool:
        return self._info(uri).type == self._pafs.FileType.Directory

    def entries(self, uri: str) -> List[Entry]:
        if not self.is_dir(uri):
            return []
        infos = self.fs.get_file_info(self._pafs.FileSelector(self._p(uri), recursive=False))
        base = uri.rstrip("/")
        out = [Entry(i.base_name, f"{base}/{i.base_name}", i.type == self._pafs.FileType.Directory,
                     int(i.size or 0)) for i in infos]
        return sorted(out)

    def read_bytes(self, uri: str) -> bytes:
        with self.fs.open_input_stream(self._p(uri)) as f:
            return f.read()

    def _write(self, uri: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._p(uri)) as f:
            f.write(data)

    def create_exclusive(self, uri: str, data: bytes) -> None:
        path = local_path(_arrow_uri(uri))
        if path is not None:
            # Written whole under a temporary name, then hard-linked: link() fails when the name
            # exists (the OS decides the race) and a reader never sees a half-written file.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            finally:
                os.unlink(tmp)
            return
        if self.exists(uri):  # pragma: no cover - needs a remote store
            raise FileExistsError(uri)
        self._write(uri, data)  # pragma: no cover

    def mkdirs(self, uri: str) -> None:
        self.fs.create_dir(self._p(uri), recursive=True)

    def delete(self, uri: str) -> None:
        info = self._info(uri)
        try:
            if info.type == self._pafs.FileType.Directory:
                self.fs.delete_dir(self._p(uri))
            elif info.type != self._pafs.FileType.NotFound:
                self.fs.delete_file(self._p(uri))
        except FileNotFoundError:  # deleted meanwhile by another process (e.g. a writer tidying up)
            pass

    def rename(self, src: str, dst: str) -> None:
        self.fs.move(self._p(src), self._p(dst))

    def parquet_counts(self, uri: str) -> Tuple[int, int]:
        import pyarrow.parquet as pq

        meta = pq.read_metadata(self._p(uri), filesystem=self.fs)
        return int(meta.num_row_groups), int(meta.num_rows)

    def arrow(self, uri: str) -> Tuple[Any, str]:
        """``(pyarrow FileSystem, path)`` for readers that take a pyarrow filesystem (pyarrow.dataset, parquet)."""
        return self.fs, self._p(uri)


class HadoopFS(FileSystem):
    """:class:`FileSystem` through Hadoop's FileSystem API in the SparkSession's JVM (driver only)."""

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
        fs, p = self._fs(uri), self._path(uri)
        return bool(fs.exists(p) and fs.getFileStatus(p).isDirectory())

    def entries(self, uri: str) -> List[Entry]:
        fs, p = self._fs(uri), self._path(uri)
        if not fs.exists(p):
            return []
        base = uri.rstrip("/")
        out = []
        for st in fs.listStatus(p):
            name = str(st.getPath().getName())
            out.append(Entry(name, f"{base}/{name}", bool(st.isDirectory()), int(st.getLen())))
        return sorted(out)

    def read_bytes(self, uri: str) -> bytes:
        stream = self._fs(uri).open(self._path(uri))
        try:
            return bytes(stream.readAllBytes())  # one byte[] crosses py4j
        finally:
            stream.close()

    def _write(self, uri: str, data: bytes) -> None:
        out = self._fs(uri).create(self._path(uri), True)
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def create_exclusive(self, uri: str, data: bytes) -> None:
        fs = self._fs(uri)
        try:
            out = fs.create(self._path(uri), False)
        except Exception as e:  # py4j wraps FileAlreadyExistsException
            if "FileAlreadyExists" in type(e).__name__ or "FileAlreadyExists" in str(e) or fs.exists(self._path(uri)):
                raise FileExistsError(uri) from None
            raise
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def mkdirs(self, uri: str) -> None:
        self._fs(uri).mkdirs(self._path(uri))

    def delete(self, uri: str) -> None:
        fs, p = self._fs(uri), self._path(uri)
        if fs.exists(p):
            fs.delete(p, True)

    def rename(self, src: str, dst: str) -> None:
        if not self._fs(src).rename(self._path(src), self._path(dst)):
            raise OSError(f"rename {src} -> {dst} failed")

    def parquet_counts(self, uri: str) -> Tuple[int, int]:
        jvm = self._jvm
        reader = jvm.org.apache.parquet.hadoop.ParquetFileReader.open(
            jvm.org.apache.parquet.hadoop.util.HadoopInputFile.fromPath(self._path(uri), self._conf))
        try:
            return int(reader.getRowGroups().size()), int(reader.getRecordCount())
        finally:
            reader.close()

    def glob(self, pattern: str) -> List[Entry]:
        """Entries matching a Hadoop glob, matched in the JVM (only hits cross py4j)."""
        found = self._fs(pattern).globStatus(self._path(pattern))
        if found is None:
            return []
        return sorted(Entry(str(st.getPath().getName()), str(st.getPath().toString()), bool(st.isDirectory()),
                            int(st.getLen())) for st in found)


def _arrow_uri(uri: str) -> str:
    return "s3://" + uri[len("s3a://"):] if uri.startswith("s3a://") else uri


def filesystem(uri: str, spark: Optional["SparkSession"] = None) -> FileSystem:
    """The :class:`FileSystem` serving ``uri``.

    ``pyarrow.fs`` for the schemes it opens (no JVM: executors and Horovod processes use the same
    object); otherwise Hadoop's API through ``spark``'s JVM, which only the driver has.
    """
    scheme = scheme_of(to_uri(uri))
    if scheme in ARROW_SCHEMES or scheme == "s3a":
        return ArrowFS(to_uri(uri))
    if spark is None:
        raise ConfigError(f"{uri}: the scheme {scheme}:// is served only through Spark's Hadoop filesystem, "
                          f"which this process has no session for; use one of "
                          f"{', '.join(s + '://' for s in ARROW_SCHEMES)}")
    return HadoopFS(spark)

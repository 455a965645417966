"""Where an input file belongs: its path below the input, its split folder, its label, its hash split.

Pure and Spark-free: the per-image step on executors, the driver and the benchmark's
plain-Python baseline all place a file with :func:`place`. The only I/O here is
:func:`layout_has_val`, which asks a :class:`pipeline.fs.FileSystem` (no Spark job).
"""
from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from pipeline.fs import is_under
from pipeline.schema import UNLABELED_SPLIT

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.fs import FileSystem

#: First-level folder names that give the split (``validation`` means ``val``).
LAYOUT_SPLITS: Mapping[str, str] = {"train": "train", "val": "val", "validation": "val", "test": "test"}
SPLIT_ORDER: Tuple[str, ...] = ("train", "val", "test")

_SCHEME_AUTHORITY = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:(//[^/]*)?")


def uri_path(uri: str) -> str:
    """The path part of a URI, without parsing ``#``/``?`` (legal in file names) as fragment/query.

    >>> uri_path("file:/data/a#1.png"), uri_path("hdfs://nn:8020/x/y")
    ('/data/a#1.png', '/x/y')
    """
    return _SCHEME_AUTHORITY.sub("", uri, count=1) or "/"


def overlap(a: str, b: str) -> bool:
    """Whether one URI's path is the other's or inside it (scheme and authority ignored)."""
    pa, pb = uri_path(a), uri_path(b)
    return is_under(pa, pb) or is_under(pb, pa)


def normalize_source(uri: str) -> str:
    """Spark lists local files as ``file:/x``; store the canonical ``file:///x`` form."""
    if uri.startswith("file:/") and not uri.startswith("file://"):
        return "file://" + uri[len("file:"):]
    return uri


def relative_parts(path: str, root: str) -> Tuple[str, ...]:
    """Folders and file name of ``path`` below ``root`` (both URIs; scheme/authority ignored)."""
    p, r = uri_path(path), uri_path(root).rstrip("/")
    if r and p.startswith(r + "/"):
        p = p[len(r) + 1:]
    else:  # not under the root (a manifest entry elsewhere): keep the file name only
        p = p.rsplit("/", 1)[-1]
    return tuple(x for x in p.split("/") if x)


def layout_split(parts: Sequence[str]) -> Tuple[Optional[str], Tuple[str, ...]]:
    """``('train', 'cat', 'x.png')`` -> ``('train', ('cat', 'x.png'))``; no split folder -> ``(None, parts)``."""
    if len(parts) > 1:
        s = LAYOUT_SPLITS.get(parts[0].lower())
        if s is not None:
            return s, tuple(parts[1:])
    return None, tuple(parts)


def folder_label(parts: Sequence[str]) -> Optional[str]:
    """The class folder: the first folder below the input (or below the split folder)."""
    return parts[0] if len(parts) > 1 else None


def hash_split(image_id_hex: str, fractions: Mapping[str, float], seed: int = 0) -> str:
    """Deterministic split from the content hash: the same image always lands in the same split."""
    h = hashlib.sha256(f"{seed}:{image_id_hex}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2.0 ** 64
    acc = 0.0
    last = "train"
    for name in SPLIT_ORDER:
        f = float(fractions.get(name, 0.0))
        if f <= 0:
            continue
        acc += f
        last = name
        if u < acc:
            return name
    return last  # rounding: u just below 1.0


def carve_fractions(fractions: Mapping[str, float]) -> Optional[Dict[str, float]]:
    """Fractions that split a layout's ``train`` folder into train and val, or None without val.

    >>> carve_fractions({"train": 0.8, "val": 0.1, "test": 0.1})
    {'train': 0.8888888888888888, 'val': 0.1111111111111111}
    """
    t, v = float(fractions.get("train", 0.0)), float(fractions.get("val", 0.0))
    if v <= 0 or t + v <= 0:
        return None
    return {"train": t / (t + v), "val": v / (t + v)}


#: How a file's split was chosen (:func:`placement`): a split folder, the hash carving val out
#: of the layout's ``train/``, or the content hash alone. Near-duplicate handling may move only
#: ``hash`` rows, and ``carved`` rows between train and val.
SPLIT_SOURCES = ("folder", "carved", "hash")


class Placement(NamedTuple):
    split: str
    label: Optional[str]
    source: str  #: one of :data:`SPLIT_SOURCES`


def placement(path: str, image_id_hex: str, *, root_uri: str, label_source: str, fractions: Mapping[str, float],
              seed: int, carve: Optional[Mapping[str, float]] = None) -> Placement:
    """Split, folder label and split source of one input file.

    A split folder wins (its ``train`` files are carved into train/val by hash when ``carve``
    is given); without one the split is the content hash's, or ``unlabeled`` when the input
    has no labels. The label is the class folder, for ``label_source == "folders"`` only.
    """
    split, rest = layout_split(relative_parts(path, root_uri))
    source = "folder"
    if split == "train" and carve is not None:
        split, source = hash_split(image_id_hex, carve, seed), "carved"
    label = folder_label(rest) if label_source == "folders" else None
    if split is None:
        source = "hash"
        split = UNLABELED_SPLIT if label_source == "none" else hash_split(image_id_hex, fractions, seed)
    return Placement(split, label, source)


def place(path: str, image_id_hex: str, **where: Any) -> Tuple[str, Optional[str]]:
    """``(split, folder label)`` of one input file (:func:`placement` without the source)."""
    p = placement(path, image_id_hex, **where)
    return p.split, p.label


def layout_has_val(fs: "FileSystem", input_uri: str) -> bool:
    """Whether the input has a first-level ``val/`` or ``validation/`` folder (any case) holding a file
    Spark would read.

    Filesystem calls on the driver only (no Spark job, no content read): one listing of the
    input's first level, then each such folder is walked until its first visible file (names
    starting with ``.``, or ``_`` without ``=``, are hidden from Spark's scan, so they do not count).
    """
    return any(e.is_dir and e.name.lower() in ("val", "validation") and fs.any_file(e.uri, skip=hidden_from_spark)
               for e in fs.entries(input_uri))


def hidden_from_spark(name: str) -> bool:
    """Spark's file index skips these names (files and folders)."""
    return name.startswith(".") or (name.startswith("_") and "=" not in name) or name.endswith("._COPYING_")

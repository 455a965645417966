"""One split of an ingest output as petastorm will shard it, checked from Parquet footers only.

:func:`split_layout` lists the split's folders (``<version>/images/split=<s>/``, and on an
appended output the earlier versions' folders its snapshot lists) through :mod:`pipeline.fs`, reads
every file's footer (a few KB each, in parallel threads) with ``pyarrow.parquet`` and
checks the schema and the row count against the ingest manifest before any reader
starts. The row groups come out in petastorm's order, because sharding is by position
in that order: row group ``i`` goes to shard ``i % shard_count``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, cast

from pipeline.contracts import IMAGES_DIR, IngestManifest, read_manifest, resolve_ingest, split_folders
from pipeline.errors import DataError
from pipeline.fs import ArrowFS, filesystem, join, to_uri
from pipeline.schema import IMAGE_FIELDS, SPLIT_COLUMN, UNLABELED_SPLIT

#: The column whose null count tells unlabelled rows apart.
LABEL_COLUMN = "label_index"
#: Arrow type names each Spark SQL type of :data:`pipeline.schema.IMAGE_FIELDS` may be stored as.
_ARROW_TYPES = {
    "string": ("string", "large_string"),
    "binary": ("binary", "large_binary"),
    "int": ("int32",),
}


@dataclass(frozen=True)
class SplitLayout:
    """Files and row groups of one split, in the order petastorm shards them."""

    split: str
    uri: str  #: the newest folder of the split (what messages name)
    files: Tuple[str, ...]
    #: Rows of every row group, in petastorm's order (files sorted by path, then row groups).
    row_group_rows: Tuple[int, ...]
    #: Rows whose ``label_index`` is null, from the footers' statistics (None = no statistics).
    null_labels: Optional[int] = None

    #: Every folder holding the split's rows (one, unless appends added folders).
    folders: Tuple[str, ...] = ()

    @property
    def reader_url(self) -> Any:
        """What petastorm opens: the folder, or when the split spans several folders the list of
        its files (petastorm reads a list of file URLs in the order given: sorted by path)."""
        return self.uri if len(self.folders) <= 1 else list(self.files)

    @property
    def num_rows(self) -> int:
        return int(sum(self.row_group_rows))

    @property
    def num_row_groups(self) -> int:
        return len(self.row_group_rows)

    def shard_rows(self, shard: int, shard_count: int) -> int:
        """Rows petastorm gives shard ``shard`` of ``shard_count`` (row group ``i`` -> shard ``i % shard_count``)."""
        return int(sum(n for i, n in enumerate(self.row_group_rows) if i % shard_count == shard))

    def shard_row_groups(self, shard: int, shard_count: int) -> int:
        return len(range(shard, self.num_row_groups, shard_count))


# --- petastorm's file order ---------------------------------------------------------------

def _skipped_file(name: str) -> bool:
    """Files the legacy ``pyarrow.parquet.ParquetDataset`` (petastorm's reader) leaves out."""
    return (name.endswith((".crc", "_$folder$", "_metadata")) or name.startswith((".", "_")))


def _private_dir(name: str) -> bool:
    return name.startswith((".", "_")) and "=" not in name


def _parquet_files(fs: ArrowFS, uri: str) -> List[str]:
    """The data files under ``uri`` as petastorm reads them: at any depth, sorted by path.

    The same rules as the legacy ``ParquetDataset`` petastorm 0.13.1 opens (so the row-group
    order, and with it the sharding, is the one the readers use): hidden, ``_``-prefixed,
    checksum and summary files are skipped, and so are private folders.
    """
    entries = fs.entries(uri)
    files = [e.uri for e in entries if not e.is_dir and not _skipped_file(e.name)]
    dirs = [e.uri for e in entries if e.is_dir and not _private_dir(e.name)]
    if files and dirs:  # the legacy reader refuses this too, with a bare ValueError
        raise DataError(f"{uri} holds both Parquet files and folders: it is not an ingest output (re-run ingest)")
    found = files + [f for d in dirs for f in _parquet_files(fs, d)]
    return sorted(found)  # one prefix for all: the order of their paths


# --- footers and checks --------------------------------------------------------------------

def _check_schema(schema: Any, where: str) -> None:
    """Raise DataError unless ``schema`` (pyarrow) holds every ingest column with its ingest type."""
    names = set(schema.names)
    problems: List[str] = []
    for f in IMAGE_FIELDS:
        if f.name == SPLIT_COLUMN:  # the hive partition folder, not a column in the files
            continue
        if f.name not in names:
            problems.append(f"missing column '{f.name}'")
            continue
        got = str(schema.field(f.name).type)
        if got not in _ARROW_TYPES[f.spark_type]:
            problems.append(f"column '{f.name}' is {got}, expected {f.spark_type}")
    if problems:
        raise DataError(
            f"{where} does not have the ingest schema ({'; '.join(problems)}): "
            "point the loader at a pixelmill ingest output, or re-run ingest"
        )


def _footers(fs: ArrowFS, files: List[str]) -> List[Any]:
    import pyarrow.parquet as pq

    def footer(uri: str) -> Any:
        arrow_fs, path = fs.arrow(uri)
        return pq.read_metadata(path, filesystem=arrow_fs)

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return list(pool.map(footer, files))


def _row_groups(files: List[str], metas: List[Any]) -> Tuple[List[int], Optional[int]]:
    """Rows of every row group in order, and the null labels (None when a footer has no statistics)."""
    rows: List[int] = []
    nulls: Optional[int] = 0
    for uri, meta in zip(files, metas):
        schema = meta.schema.to_arrow_schema()
        _check_schema(schema, uri)
        col = schema.get_field_index(LABEL_COLUMN)
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            rows.append(int(rg.num_rows))
            stats = rg.column(col).statistics if col >= 0 else None
            if nulls is not None and stats is not None and stats.has_null_count:
                nulls += int(stats.null_count)
            else:
                nulls = None
    return rows, nulls


def split_layout(data_uri: str, split: str, *, manifest: Optional[IngestManifest] = None) -> SplitLayout:
    """Read the footers of ``<data_uri>/images/split=<split>/`` and check them against the ingest schema.

    Only footers are read (a few KB per file), in parallel threads.
    """
    data_uri = to_uri(data_uri)
    # Without a session filesystem() serves pyarrow.fs only (or says which scheme it cannot open).
    fs = cast(ArrowFS, filesystem(data_uri))
    data = resolve_ingest(data_uri, fs)
    manifest = manifest if manifest is not None else read_manifest(data.root, fs)
    folders = [u for u in split_folders(data, split) if fs.exists(u)]
    if not folders:
        known = sorted(k for k, v in manifest.splits.items() if v)
        raise DataError(
            f"split '{split}' not found in {data_uri} (no {IMAGES_DIR}/{SPLIT_COLUMN}={split}/; "
            f"this output has: {', '.join(known) or 'no splits'}): pick one of those, "
            "or re-run ingest with ingest.split_fractions giving it a share"
        )
    files = sorted(f for u in folders for f in _parquet_files(fs, u))
    if not files:
        raise DataError(f"split '{split}' of {data_uri} holds no Parquet files: re-run ingest")
    rows, nulls = _row_groups(files, _footers(fs, files))
    layout = SplitLayout(split, folders[-1], tuple(files), tuple(rows), nulls, tuple(folders))
    expected = manifest.splits.get(split)
    if expected is not None and int(expected) != layout.num_rows:
        raise DataError(
            f"split '{split}' of {data_uri} holds {layout.num_rows} rows but the manifest says {expected}: "
            "the output was modified after ingest committed it (re-run ingest)"
        )
    return layout


def check_shards(layout: SplitLayout, size: int, data_uri: str) -> None:
    """Every training process needs at least one row group (petastorm raises NoDataAvailableError)."""
    if layout.num_row_groups < size:
        raise DataError(
            f"split '{layout.split}' of {data_uri} has {layout.num_row_groups} Parquet row groups but {size} "
            f"training processes each need at least one: set ingest.max_train_procs >= {size} and re-run ingest "
            f"(or train with train.num_proc <= {layout.num_row_groups})"
        )


def check_labelled(layout: SplitLayout, data_uri: str) -> None:
    if layout.split == UNLABELED_SPLIT or (layout.null_labels or 0) > 0:
        raise DataError(
            f"split '{layout.split}' of {data_uri} has rows without labels "
            f"({layout.null_labels if layout.null_labels else 'all'}): train and evaluate on labelled splits "
            "(train/val/test), or re-run ingest with labels (ingest.label_source)"
        )

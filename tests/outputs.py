"""Where a committed output's files are: tests read them as users read them, through the snapshot."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from pipeline.commit import version_root
from pipeline.fs import local_path


def version_dir(out: Union[str, Path]) -> Path:
    """The folder of the newest committed version of output ``out`` (a path or a file:// URI)."""
    path = local_path(version_root(str(out)))
    assert path is not None
    return Path(path)


def _listed(out: Union[str, Path], kind: str):
    """``(folder, split or None)`` of every folder of ``kind`` the newest snapshot of ``out`` lists."""
    from pipeline.commit import committed
    from pipeline.fs import filesystem, join, to_uri

    u = to_uri(str(out))
    found = committed(filesystem(u), u)
    assert found is not None, f"{out} holds no committed version"
    if not any(f.kind == kind for f in found.files):  # the earlier layout
        return [(Path(local_path(found.root)) / ("images" if kind == "images" else "rejects"), None)]
    rows = []
    for f in found.files:
        if f.kind == kind and (f.rows > 0 or kind == "rejects"):  # a split of no rows has no folder
            folder = Path(local_path(join(found.uri, f.path)))
            rows.append((folder, folder.name.split("=", 1)[1] if "=" in folder.name else None))
    return rows


def images_table(out: Union[str, Path]):
    """Every stored image of the newest version of ingest output ``out`` (all the folders its snapshot
    lists: an append adds folders), as one pyarrow table with the ``split`` column."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    tables = []
    for folder, split in _listed(out, "images"):
        if split is None:  # a folder of split=... folders
            tables.append(pads.dataset(str(folder), format="parquet", partitioning="hive").to_table())
        else:
            t = pads.dataset(str(folder), format="parquet").to_table()
            tables.append(t.append_column("split", pa.array([split] * t.num_rows, pa.string())))
    return pa.concat_tables(tables, promote_options="default") if tables else pa.table({})


def rejects_table(out: Union[str, Path]):
    """Every reject of the newest version of ingest output ``out`` (see :func:`images_table`)."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    tables = [pads.dataset(str(folder), format="parquet").to_table() for folder, _ in _listed(out, "rejects")]
    return pa.concat_tables(tables, promote_options="default")

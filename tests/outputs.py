"""Where a committed output's files are: tests read them as users read them, through the snapshot."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from pipeline.commit import committed
from pipeline.fs import filesystem, local_path, to_uri


def version_dir(out: Union[str, Path]) -> Path:
    """The folder of the newest committed version of output ``out`` (a path or a file:// URI)."""
    uri = to_uri(str(out))
    found = committed(filesystem(uri), uri)
    assert found is not None, f"{uri} holds no committed version"
    path = local_path(found.root)
    assert path is not None
    return Path(path)

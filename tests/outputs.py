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

"""Open an HTML page in a real headless Chromium (Debian's ``chromium``) and read what it rendered."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no headless browser: `make setup` installs Debian's chromium (apt-get install chromium)")


def rendered(page: Path) -> Dict[str, object]:
    """The page's DOM after load: its ``data-images-total`` / ``data-images-loaded`` and its text."""
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--allow-file-access-from-files", "--virtual-time-budget=15000", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    dom = out.stdout
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, "the page's load script did not run: " + dom[:500]
    return {"total": int(total.group(1)), "loaded": int(loaded.group(1)), "dom": dom}

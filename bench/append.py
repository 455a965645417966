"""Benchmark: what ``ingest --mode append`` of 1% new files costs against a full ingest.

    .venv/bin/python bench/append.py

Data: the demo's input, Fashion-MNIST (Debian ``dataset-fashion-mnist``) exported as 70,000
PNGs in train/ and test/ class folders (``conf/fashion_mnist.yaml``). Each round, as users run
it (one cold ``python -m pipeline ingest`` process, start-up included):

* **full**: ``--mode overwrite`` of all 70,000 files into a fresh output;
* **append**: an output holding 99% of the files (ingested beforehand, not timed), then
  ``--mode append`` of the whole input, so that 1% of the files are new. The new files are
  moved back into place with their old modification times (as ``mv`` or ``rsync -a`` bring
  photos in): the append finds them by path, the other 99% are unchanged since the listing.

With ``BENCH_APPEND_INPUT=folder`` the append's ``--input`` is a folder holding only the new
files (same class-folder layout), as when new photos land in a drop folder. With
``BENCH_APPEND_LISTING=executors`` every run lists and reads on executors (``ingest.listing``).

Rounds alternate full and append (``BENCH_REPEATS``, default 3). ``ratio`` = median append
wall time / median full wall time (target <= 0.10). Also printed: the stage timings of the
last append (``list_s``, ``unchanged_s``, ``clean_s``, ``write_s`` ...), the files it read
and the rows its version wrote.
Ends with one JSON line.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
NEW_FRACTION = 0.01
#: ``whole`` (default): append the whole input; ``folder``: append only a folder holding the new files.
FROM_FOLDER = os.environ.get("BENCH_APPEND_INPUT", "whole") == "folder"
#: ``ingest.listing`` of every run (``spark`` or ``executors``).
LISTING = os.environ.get("BENCH_APPEND_LISTING", "spark")


def _export() -> Path:
    from pipeline.sample_data import export_class_folders

    dest = CACHE / "fashion70k"
    export_class_folders(dest)
    # A fresh export is younger than ingest.unchanged_margin_s: every file would count as modified
    # since the base ingest's listing. Photos arriving in a dataset are older than that; so are these.
    files = list(dest.rglob("*.png"))
    old = time.time() - 86_400
    if files and files[0].stat().st_mtime > old:
        for p in files:
            os.utime(p, (old, old))
    return dest


def _ingest(src: Path, out: Path, mode: str) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "pipeline", "ingest", "--input", str(src), "--output", str(out), "--mode", mode,
           "--config", "local.yaml", "--config", "fashion_mnist.yaml", "--set", "spark.ui_enabled=false",
           "--set", f"ingest.listing={LISTING}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"bench/append.py: ingest --mode {mode} failed: {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    return {"wall_s": round(wall, 2), **summary}


def _held_out(src: Path) -> List[Path]:
    """Every 100th file of the input (sorted paths): the "new" 1%."""
    files = sorted(p for p in src.rglob("*.png"))
    step = round(1 / NEW_FRACTION)
    return files[::step]


def main() -> int:
    src = _export()
    held = _held_out(src)
    aside = CACHE / "append_held_out"
    full_out, base_out = CACHE / "append_full_out", CACHE / "append_out"
    walls: Dict[str, List[float]] = {"full": [], "append": []}
    last: Dict[str, Any] = {}
    for _ in range(REPEATS):
        walls["full"].append(_ingest(src, full_out, "overwrite")["wall_s"])
        # the output as it was before the new files arrived
        shutil.rmtree(aside, ignore_errors=True)
        for p in held:
            dest = aside / p.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            p.rename(dest)
        try:
            shutil.rmtree(base_out, ignore_errors=True)
            _ingest(src, base_out, "overwrite")
            if FROM_FOLDER:  # the new files in a folder of their own, the same layout
                last = _ingest(aside, base_out, "append")
        finally:
            for p in held:
                (aside / p.relative_to(src)).rename(p)
        if not FROM_FOLDER:
            last = _ingest(src, base_out, "append")
        walls["append"].append(last["wall_s"])
    full, append = statistics.median(walls["full"]), statistics.median(walls["append"])
    result = {"bench": "append", "ratio": round(append / full, 3), "append_input": "folder" if FROM_FOLDER else "whole",
              "listing": LISTING,
              "full_s": walls["full"],
              "append_s": walls["append"], "files": last["files_seen"], "new_files": len(held),
              "files_read": last["run"].get("files_read"), "written": last.get("written"),
              "append_timings": last.get("timings"),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: how the ingest's driver memory, time to first task and throughput grow with the file count.

    .venv/bin/python bench/scale.py

Data (built once in ``bench/.cache/scale``, git-ignored): distinct real images, Fashion-MNIST's
70,000 (Debian ``dataset-fashion-mnist``) each also flipped and shifted by one pixel (18 variants),
as 28x28 grayscale PNGs in ``<label>/<bucket>/<n>.png`` with 1,000 files per bucket. The 1M tree is
written; the 10k and 100k trees are hard links to its first buckets.

Per size (``BENCH_SCALE_SIZES``, default ``10000,100000,1000000``) and per listing mode
(``ingest.listing`` = ``spark``: Spark's ``binaryFile`` file index on the driver; ``executors``:
folders expanded and listed by executor tasks, :mod:`pipeline.ingest.listing`), one cold
``python -m pipeline ingest --mode overwrite`` as users run it, on a ``local-cluster[1,2,...]``
master: the executor is a JVM of its own, so the driver's memory is the driver's alone. Modes
alternate within a size. Measured per run:

* ``driver_peak_mb``: the peak of the driver's resident memory, the ``python -m pipeline``
  process plus the driver JVM (their kernel high-water marks, ``VmHWM``, summed); executor JVMs
  and Python workers are not counted;
* ``first_task_s``: process start to the first task launched (Spark event log), and
  ``first_read_s`` to the first task of the job that reads and cleans the image bytes;
* ``wall_s`` (whole process) and ``images_per_s`` = files / wall.

Near-duplicate grouping is off (``ingest.near_duplicates=off``): the flipped and shifted
variants are near-duplicates by construction, and that step is measured by bench/near_dups.py.

``ratio`` = executors mode's driver peak at the largest size / at the smallest (target <= 1.2).
The JSON last line also carries, for executors mode, ``driver_peak_mb_10k``, ``driver_peak_mb_1m``,
``first_task_s_1m``, ``images_per_s_100k``, ``images_per_s_1m``, their ratios, a log-log slope of
each figure against the file count, and every run of both modes under ``runs``.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipeline import sample_data

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
ROOT = CACHE / "scale"
SIZES = tuple(int(s) for s in os.environ.get("BENCH_SCALE_SIZES", "10000,100000,1000000").split(","))
MODES = ("spark", "executors")
LABELS = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
PER_BUCKET = 1000
VARIANTS = [(flip, dy, dx) for flip in (False, True) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


# --- data ------------------------------------------------------------------------------------

def _variant(img: np.ndarray, v: int) -> np.ndarray:
    flip, dy, dx = VARIANTS[v]
    out = img[:, ::-1] if flip else img
    return np.roll(np.roll(out, dy, axis=0), dx, axis=1)


_IMAGES: Optional[np.ndarray] = None
_LABELS: Optional[np.ndarray] = None


def _load_pool() -> None:
    global _IMAGES, _LABELS
    src = sample_data.locate_fashion_mnist(CACHE)
    parts = [sample_data.load_split(src, s) for s in ("train", "test")]
    _IMAGES = np.concatenate([p[0] for p in parts])
    _LABELS = np.concatenate([p[1] for p in parts])


def _write_bucket(job: Tuple[str, int, Sequence[int]]) -> None:
    """Write one bucket: ``job`` = (folder, label index, global image numbers)."""
    import io

    from PIL import Image

    folder, _, numbers = job
    os.makedirs(folder, exist_ok=True)
    assert _IMAGES is not None
    n_src = len(_IMAGES)
    for k in numbers:
        img = _variant(_IMAGES[k % n_src], k // n_src)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, "PNG")
        with open(os.path.join(folder, f"{k:07d}.png"), "wb") as f:
            f.write(buf.getvalue())


def build_tree(n: int) -> Path:
    """The ``n``-file tree (``n`` a multiple of 10 x 1,000); the largest is written, smaller ones linked."""
    big = max(SIZES)
    tree = ROOT / f"files_{n}"
    if (tree / ".complete").is_file():
        return tree
    if n < big:
        src = build_tree(big)
        shutil.rmtree(tree, ignore_errors=True)
        for label in LABELS:
            for b in range(n // (10 * PER_BUCKET)):
                rel = Path(label) / f"{b:04d}"
                (tree / rel).mkdir(parents=True, exist_ok=True)
                for f in os.scandir(src / rel):
                    os.link(f.path, tree / rel / f.name)
        (tree / ".complete").write_text("ok\n")
        return tree
    _load_pool()
    assert _IMAGES is not None and _LABELS is not None
    if n > len(_IMAGES) * len(VARIANTS):
        raise SystemExit(f"bench/scale.py: at most {len(_IMAGES) * len(VARIANTS)} distinct files (asked {n})")
    shutil.rmtree(tree, ignore_errors=True)
    per_label: Dict[int, List[int]] = {c: [] for c in range(10)}
    need = n // 10
    k = 0
    while min(len(v) for v in per_label.values()) < need:  # image numbers k, label of k % 70,000
        c = int(_LABELS[k % len(_IMAGES)])
        if len(per_label[c]) < need:
            per_label[c].append(k)
        k += 1
    jobs = [(str(tree / LABELS[c] / f"{b:04d}"), c, nums[b * PER_BUCKET:(b + 1) * PER_BUCKET])
            for c, nums in per_label.items() for b in range(need // PER_BUCKET)]
    t = time.perf_counter()
    with mp.get_context("fork").Pool(2) as pool:
        for i, _ in enumerate(pool.imap_unordered(_write_bucket, jobs)):
            if i % 100 == 0:
                print(f"bench/scale.py: writing the {n}-file tree: {i * PER_BUCKET} files, "
                      f"{time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    (tree / ".complete").write_text("ok\n")
    return tree


# --- one cold run ----------------------------------------------------------------------------

def _config() -> Path:
    """The bench's config: Fashion-MNIST's ingest settings on a local-cluster master."""
    path = ROOT / "scale.yaml"
    events = ROOT / "events"
    events.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    path.write_text(f"""\
spark:
  master: local-cluster[1,2,4096]
  ui_enabled: false
  conf:
    spark.executor.memory: 3g
    spark.executor.cores: "2"
    spark.driver.memory: 4g
    spark.driver.host: 127.0.0.1
    spark.driver.bindAddress: 127.0.0.1
    spark.pyspark.python: {py}
    spark.pyspark.driver.python: {py}
    spark.executorEnv.PYTHONPATH: {REPO}
    spark.hadoop.fs.file.impl: org.apache.hadoop.fs.RawLocalFileSystem
    spark.eventLog.enabled: "true"
    spark.eventLog.dir: {events.as_uri()}
    spark.eventLog.rolling.enabled: "false"
    spark.eventLog.compress: "false"
    spark.sql.shuffle.partitions: "8"
ingest:
  height: 28
  width: 28
  color_mode: L
  resize_policy: stretch
  encode_format: png
  min_side: 8
  near_duplicates: "off"
""")
    return path


def _descendants(pid: int) -> List[int]:
    kids: Dict[int, List[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _is_driver(pid: int, root: int) -> bool:
    """The ``python -m pipeline`` process itself, or the driver JVM (``SparkSubmit``)."""
    if pid == root:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ")
    except OSError:
        return False
    return b"org.apache.spark.deploy.SparkSubmit" in cmd


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Peak(threading.Thread):
    """Polls the driver processes' high-water marks until stopped."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.hwm, self.stop = root, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for p in _descendants(self.root):
                if p in self.hwm or _is_driver(p, self.root):
                    self.hwm[p] = max(self.hwm.get(p, 0), _hwm_kb(p))

    @property
    def mb(self) -> float:
        return round(sum(self.hwm.values()) / 1024, 1)


def _events(before: set) -> Dict[str, Any]:
    """First task launch (ms since the epoch), overall and of the read-and-clean job, from the new event log."""
    new = [p for p in (ROOT / "events").iterdir() if p.name not in before]
    if len(new) != 1:
        raise SystemExit(f"bench/scale.py: expected one new event log, found {len(new)}")
    stage_job: Dict[int, str] = {}
    first_any: Optional[int] = None
    first_read: Optional[int] = None
    with open(new[0]) as f:
        for line in f:
            if '"SparkListenerJobStart"' in line:
                e = json.loads(line)
                desc = (e.get("Properties") or {}).get("spark.job.description", "")
                for s in e.get("Stage IDs", []):
                    stage_job[s] = desc
            elif '"SparkListenerTaskStart"' in line:
                e = json.loads(line)
                t = int(e["Task Info"]["Launch Time"])
                first_any = t if first_any is None else min(first_any, t)
                if stage_job.get(e["Stage ID"], "").startswith("ingest: clean") and first_read is None:
                    first_read = t
    new[0].unlink()
    return {"first_any_ms": first_any, "first_read_ms": first_read}


def run_once(tree: Path, mode: str, cfg: Path) -> Dict[str, Any]:
    out = ROOT / "out"
    shutil.rmtree(out, ignore_errors=True)
    before = set(p.name for p in (ROOT / "events").iterdir())
    cmd = [sys.executable, "-m", "pipeline", "ingest", "--input", str(tree), "--output", str(out),
           "--mode", "overwrite", "--config", str(cfg), "--set", f"ingest.listing={mode}"]
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    start = time.time()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = _Peak(proc.pid)
    peak.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    peak.stop.set()
    peak.join()
    if proc.returncode != 0:
        raise SystemExit(f"bench/scale.py: ingest ({mode}, {tree.name}) exited {proc.returncode}: "
                         f"{stderr.strip().splitlines()[-1:]}")
    summary = json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])
    ev = _events(before)
    shutil.rmtree(out, ignore_errors=True)
    files = int(summary["files_seen"])
    r = {"mode": mode, "files": files, "accepted": summary.get("accepted"), "wall_s": round(wall, 2),
         "images_per_s": round(files / wall, 1), "driver_peak_mb": peak.mb,
         "first_task_s": round(ev["first_any_ms"] / 1000 - start, 2) if ev["first_any_ms"] else None,
         "first_read_s": round(ev["first_read_ms"] / 1000 - start, 2) if ev["first_read_ms"] else None,
         "list_s": (summary.get("timings") or {}).get("list_s")}
    print(f"bench/scale.py: {json.dumps(r)}", file=sys.stderr, flush=True)
    return r


def _slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(y) on log(x): 0 = flat, 1 = linear in the file count."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 3) if den else None


def _tag(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


def main() -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    cfg = _config()
    trees = {n: build_tree(n) for n in sorted(SIZES)}
    runs: List[Dict[str, Any]] = []
    for n in sorted(SIZES):
        for mode in MODES:
            runs.append(run_once(trees[n], mode, cfg))
    lo, hi = min(SIZES), max(SIZES)
    mid = sorted(SIZES)[-2] if len(SIZES) > 1 else hi
    by = {(r["mode"], r["files"]): r for r in runs}
    print(f"{'mode':>10} {'files':>9} {'wall s':>8} {'images/s':>9} {'driver MB':>10} {'1st task s':>10} "
          f"{'1st read s':>10}")
    for r in runs:
        print(f"{r['mode']:>10} {r['files']:>9} {r['wall_s']:>8} {r['images_per_s']:>9} {r['driver_peak_mb']:>10} "
              f"{r['first_task_s']!s:>10} {r['first_read_s']!s:>10}")
    ex = {n: by[("executors", n)] for n in sorted(SIZES)}
    sp = {n: by[("spark", n)] for n in sorted(SIZES)}
    result: Dict[str, Any] = {"bench": "scale", "ratio": round(ex[hi]["driver_peak_mb"] / ex[lo]["driver_peak_mb"], 3),
                              f"driver_peak_mb_{_tag(lo)}": ex[lo]["driver_peak_mb"],
                              f"driver_peak_mb_{_tag(hi)}": ex[hi]["driver_peak_mb"],
                              f"first_task_s_{_tag(hi)}": ex[hi]["first_task_s"],
                              f"first_read_s_{_tag(hi)}": ex[hi]["first_read_s"],
                              f"images_per_s_{_tag(mid)}": ex[mid]["images_per_s"],
                              f"images_per_s_{_tag(hi)}": ex[hi]["images_per_s"],
                              "ratio_images_per_s": round(ex[hi]["images_per_s"] / ex[mid]["images_per_s"], 3)}
    for mode, rs in (("executors", ex), ("spark", sp)):
        xs = sorted(rs)
        for key in ("driver_peak_mb", "first_task_s", "wall_s"):
            result[f"slope_{key}_{mode}"] = _slope(xs, [rs[x][key] for x in xs])
    result["spark_driver_peak_mb_" + _tag(hi)] = sp[hi]["driver_peak_mb"]
    result["spark_first_task_s_" + _tag(hi)] = sp[hi]["first_task_s"]
    result["spark_images_per_s_" + _tag(hi)] = sp[hi]["images_per_s"]
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result["runs"] = {f"{r['mode']}_{_tag(r['files'])}": r for r in runs}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

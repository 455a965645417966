"""Benchmark: pixelmill's ingest and scoring vs Ray Data and Daft, each a whole cold process.

    .venv/bin/python bench/peers.py            # BENCH_REPEATS=3 rounds by default
    BENCH_QUICK=1 .venv/bin/python bench/peers.py   # 2,000 + 200 images, 1 round: a smoke run

Measures what a user waits for: every job is a fresh process (interpreter start, imports,
Spark JVM or Ray cluster start, the work, the Parquet write, shutdown), timed from spawn to
exit, on the same 2 CPUs. Per round every job runs once, in a fixed order (pixelmill,
pixelmill under spark-submit, Ray Data, Daft per dataset, then the two scorers), so a busy
machine slows all of them alike; medians over ``BENCH_REPEATS`` rounds count.

Data (prepared once in ``bench/.cache/``, git-ignored), from :mod:`bench/ingest.py`'s own
preparation: ``fashion`` = 20,000 real Fashion-MNIST 28x28 PNGs in class folders, stored as
28x28 L PNG; ``photos`` = 2,000 ~500x375 JPEGs cut from scikit-image's bundled photos, stored
as 224x224 RGB PNG (center crop).

The jobs:

* **pixelmill**: ``python -m pipeline ingest --config conf/local.yaml`` with the overrides
  ``bench/ingest.py`` uses (``local[2]``); also through ``spark-submit jobs/ingest.py``
  (reported as its own row; the ratios use ``python -m pipeline``).
* **Ray Data** (``bench/peers/ray_ingest.py``): ``read_binary_files`` -> ``map_batches``
  doing the same Pillow work per image -> ``write_parquet``, ``ray.init(num_cpus=2)``.
* **Daft** (``bench/peers/daft_ingest.py``): ``download`` -> native ``decode_image`` ->
  center ``crop`` -> ``resize`` -> ``encode_image`` PNG -> ``write_parquet``; sha256 in a
  batch Python function (Daft's native hashes stop at sha1).
* **scoring**: ``python -m pipeline score --split all`` on an ingest output of the fashion
  data with a 1-epoch model trained by ``python -m pipeline train`` (both made once), vs
  Ray Data ``read_parquet`` -> ``map_batches`` with a class that loads the same
  ``model.keras`` once (safe mode) on 2 actors of 1 CPU -> ``write_parquet``
  (``bench/peers/ray_score.py``).

The peers need numpy 2 / pyarrow >= 15, so they get their own venv,
``bench/.cache/peers-venv`` (made once; a stamp holding the pins makes reruns skip it).
Every job's output is read back: the Parquet row count must be the number of input images
and one stored image must decode to the stored size and mode; the two scorers' predicted
classes must agree on >= 99% of the images. Any miss fails the run. Also reported, on 64
images matched by ``image_id``: the share a peer stored byte for byte as pixelmill did, and
the mean absolute pixel difference (Ray Data runs the same Pillow code: 1.0 and 0.0).

The last line of output is one JSON object: medians in seconds (``<job>_<dataset>_s``; for
pixelmill also ``..._in_run_s``, the part spent inside ``pipeline.<stage>.run``, the rest
being interpreter, imports, JVM and session start and stop), ``ratio_vs_<peer>_<dataset>``
= peer seconds / pixelmill seconds (> 1: pixelmill is faster), ``ratio_vs_ray_score``, and
``ratio`` = the smallest of the four ingest ratios.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
CACHE = BENCH / ".cache"
WORK = CACHE / "peers"
PEER_VENV = CACHE / "peers-venv"
PEER_SCRIPTS = BENCH / "peers"
#: One set, installed together. TF 2.18.1 is the newest the project runs and accepts numpy 2.0;
#: keras and ml-dtypes as in the project's venv so that both load the same model.keras alike;
#: Pillow as in the project so the Ray peer's Pillow work is the same code.
PEER_PINS = ("ray[data]==2.60.0", "daft==0.7.26", "tensorflow-cpu==2.18.1", "keras==3.15.1",
             "ml-dtypes>=0.4,<0.5", "pillow==11.3.0")
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
REPEATS = 1 if QUICK else int(os.environ.get("BENCH_REPEATS", "3"))
CPUS = 2
N_FASHION = 2_000 if QUICK else 20_000
N_PHOTOS = 200 if QUICK else 2_000
PROJECT_PY = sys.executable
SPARK_SETS = ("spark.ui_enabled=false", "spark.log_level=ERROR")


def _load_bench_ingest() -> Any:
    """bench/ingest.py as a module: its data preparation is the one this benchmark reuses."""
    spec = importlib.util.spec_from_file_location("bench_ingest", BENCH / "ingest.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


bench_ingest = _load_bench_ingest()


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path        # <root>/<label>/<file>
    files: int
    height: int
    width: int
    mode: str         # L | RGB

    @property
    def overrides(self) -> List[str]:
        """The ``--set`` values bench/ingest.py runs this dataset with."""
        return [*bench_ingest.BASE_OVERRIDES, f"ingest.height={self.height}", f"ingest.width={self.width}",
                f"ingest.color_mode={self.mode}", "ingest.encode_format=png"]


# --- set-up ----------------------------------------------------------------------------------

def ensure_peer_venv() -> Path:
    """The peers' venv (made once); returns its python."""
    py = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / ".peers-installed"
    want = "\n".join(PEER_PINS) + "\n"
    if py.is_file() and stamp.is_file() and stamp.read_text() == want:
        return py
    print(f"creating the peers' venv in {PEER_VENV} ({', '.join(PEER_PINS)}): a few minutes, once", flush=True)
    subprocess.run([PROJECT_PY, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PEER_PINS], check=True)
    stamp.write_text(want)
    return py


def _subset(src: Path, name: str, n: int) -> Path:
    """``n`` files of ``src/<label>/``, the same share from every label, hard-linked (made once)."""
    top = WORK / "data" / f"{name}-{n}"
    root, done = top / "data", top / ".complete"  # the stamp outside the input: Daft would list it
    if done.is_file():
        return root
    shutil.rmtree(top, ignore_errors=True)
    labels = sorted(p for p in src.iterdir() if p.is_dir())
    per = n // len(labels)
    for d in labels:
        (root / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:per]:
            os.link(f, root / d.name / f.name)
    done.write_text("ok\n")
    return root


def prepare_datasets() -> List[Dataset]:
    fashion = bench_ingest.prepare_fashion() / "data"
    photos = bench_ingest.prepare_photos() / "data"
    if QUICK:
        fashion, photos = _subset(fashion, "fashion", N_FASHION), _subset(photos, "photos", N_PHOTOS)
    out = []
    for name, root, h, w, mode in (("fashion", fashion, 28, 28, "L"), ("photos", photos, 224, 224, "RGB")):
        files = sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        out.append(Dataset(name, root, files, h, w, mode))
    return out


def project_env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(PROJECT_PY).parent) + os.pathsep + env.get("PATH", "")
    env["PYSPARK_PYTHON"] = env["PYSPARK_DRIVER_PYTHON"] = PROJECT_PY
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def peer_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYSPARK_PYTHON")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_logged(cmd: Sequence[str], env: Dict[str, str], log: Path) -> float:
    """Run one whole process; its wall seconds, spawn to exit. Fails with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        t = time.perf_counter()
        rc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
        secs = time.perf_counter() - t
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"bench/peers: exit code {rc} from {' '.join(cmd)}\n--- last lines of {log}:\n{tail}")
    return secs


def last_json(log: Path) -> Dict[str, Any]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        s = line.strip()
        if s.startswith("{") and s.endswith("}"):
            return json.loads(s)
    raise SystemExit(f"bench/peers: no JSON summary in {log}")


def prepare_scoring(fashion: Dataset, env: Dict[str, str]) -> Dict[str, Any]:
    """An ingest output of the fashion data and a 1-epoch model trained on it (made once)."""
    root = WORK / f"score-{fashion.files}"
    data, model = root / "ingest", root / "model"
    if not (data / "_snapshots").is_dir():
        print(f"preparing the scoring data: ingest of {fashion.files} fashion images into {data}", flush=True)
        shutil.rmtree(data, ignore_errors=True)
        run_logged([PROJECT_PY, "-m", "pipeline", "ingest", "--input", str(fashion.root), "--output", str(data),
                    "--config", "conf/local.yaml", "--mode", "overwrite", *_sets(fashion.overrides)],
                   env, root / "ingest.log")
    if not (model / "model.json").is_file():
        print(f"training a 1-epoch model for the scoring comparison into {model}", flush=True)
        run_logged([PROJECT_PY, "-m", "pipeline", "train", "--data", str(data), "--model-dir", str(model),
                    "--config", "conf/local.yaml", "--config", "conf/fashion_mnist.yaml", "--epochs", "1",
                    "--mode", "overwrite", *_sets(SPARK_SETS)], env, root / "train.log")
    manifest = json.loads((pixelmill_dir(data) / "_manifest.json").read_text())
    return {"data": data, "model": model, "rows": int(manifest["accepted"])}


def _sets(overrides: Sequence[str]) -> List[str]:
    return [a for o in overrides for a in ("--set", o)]


# --- reading the outputs back ------------------------------------------------------------------

def pixelmill_dir(out: Path) -> Path:
    """The folder of a pixelmill output's newest committed version (its newest snapshot names it)."""
    snaps = sorted((out / "_snapshots").glob("[0-9]*.json"))
    if not snaps:
        raise SystemExit(f"bench/peers: {out} holds no committed pixelmill version")
    return out / json.loads(snaps[-1].read_text())["info"]["root"]


def parquet_files(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*.parquet")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(root).parts))


def check_images(root: Path, expected_rows: int, ds: Dataset, who: str) -> None:
    """The output under ``root`` has ``expected_rows`` rows and its first image has the stored size and mode."""
    import pyarrow.parquet as pq
    from PIL import Image

    files = parquet_files(root)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows != expected_rows:
        raise SystemExit(f"bench/peers: {who} wrote {rows} rows in {len(files)} Parquet files under {root}, "
                         f"expected {expected_rows}")
    first = next(f for f in files if pq.ParquetFile(f).metadata.num_rows)
    blob = pq.ParquetFile(first).read_row_group(0, columns=["image"]).column(0)[0].as_py()
    with Image.open(io.BytesIO(blob)) as im:
        if (im.size, im.mode, im.format) != ((ds.width, ds.height), ds.mode, "PNG"):
            raise SystemExit(f"bench/peers: {who} stored a {im.format} {im.size} {im.mode} image in {first}, "
                             f"expected PNG {(ds.width, ds.height)} {ds.mode}")


def predictions(root: Path) -> Dict[str, int]:
    import pyarrow.parquet as pq

    out: Dict[str, int] = {}
    for f in parquet_files(root):
        t = pq.read_table(f, columns=["image_id", "pred_index"])
        out.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
    return out


# --- the jobs --------------------------------------------------------------------------------------

def ingest_jobs(ds: Dataset, peer_py: Path) -> Dict[str, Any]:
    """name -> (command, environment, output dir, who checks it)."""
    def out(tool: str) -> Path:
        return WORK / "out" / f"{tool}-{ds.name}"

    pixel_args = ["--input", str(ds.root), "--config", "conf/local.yaml", "--mode", "overwrite", *_sets(ds.overrides)]
    peer_args = ["--input", str(ds.root), "--height", str(ds.height), "--width", str(ds.width), "--mode", ds.mode]
    penv, xenv = project_env(), peer_env()
    submit = ["spark-submit", "--master", f"local[{CPUS}]", "--driver-memory", "4g",
              "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
              str(REPO / "jobs" / "ingest.py")]
    return {
        "pixelmill": ([PROJECT_PY, "-m", "pipeline", "ingest", "--output", str(out("pixelmill")), *pixel_args],
                      penv, out("pixelmill")),
        "pixelmill_submit": ([*submit, "--output", str(out("pixelmill_submit")), *pixel_args], penv,
                             out("pixelmill_submit")),
        "ray": ([str(peer_py), str(PEER_SCRIPTS / "ray_ingest.py"), "--output", str(out("ray")), "--cpus", str(CPUS),
                 *peer_args], xenv, out("ray")),
        "daft": ([str(peer_py), str(PEER_SCRIPTS / "daft_ingest.py"), "--output", str(out("daft")), *peer_args],
                 xenv, out("daft")),
    }


def run_ingest(tool: str, job: Any, ds: Dataset, rep: int) -> Tuple[float, Optional[float]]:
    """Wall seconds of the whole process and, for pixelmill, the seconds inside ``ingest.run``."""
    cmd, env, out = job
    shutil.rmtree(out, ignore_errors=True)
    log = WORK / "logs" / f"{tool}-{ds.name}-{rep}.log"
    secs = run_logged(cmd, env, log)
    if not tool.startswith("pixelmill"):
        check_images(out, ds.files, ds, tool)
        return secs, None
    s = last_json(log)
    rejected = sum(s["rejected"].values())
    if s["accepted"] + rejected != ds.files:
        raise SystemExit(f"bench/peers: {tool} accounted for {s['accepted']} + {rejected} of {ds.files} files")
    check_images(pixelmill_dir(out) / "images", s["accepted"], ds, tool)
    return secs, float(s["timings"]["total_s"])


def compare_images(peer_out: Path, pixelmill_out: Path, sample: int = 64) -> Dict[str, float]:
    """How close a peer's stored images are to pixelmill's, on ``sample`` images matched by image_id.

    ``same_bytes``: the share stored byte for byte alike; ``mean_abs_diff``: mean absolute pixel
    difference (0..255). The Ray Data peer runs the same Pillow code, so it should be (1.0, 0.0);
    Daft's native resize is its own.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from PIL import Image

    first = pq.read_table(parquet_files(peer_out)[0], columns=["image_id", "image"]).slice(0, sample)
    ids = pa.array(first.column("image_id").to_pylist(), pa.string())
    theirs = dict(zip(ids.to_pylist(), first.column("image").to_pylist()))
    ours: Dict[str, bytes] = {}
    for f in parquet_files(pixelmill_dir(pixelmill_out) / "images"):
        t = pq.read_table(f, columns=["image_id", "image"])
        t = t.filter(pc.is_in(t.column("image_id"), value_set=ids))
        ours.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
    same, diffs = 0, []
    for k, b in theirs.items():
        if k not in ours:
            raise SystemExit(f"bench/peers: image {k} of {peer_out} is not in pixelmill's output {pixelmill_out}")
        same += b == ours[k]
        a, c = (np.asarray(Image.open(io.BytesIO(x)), np.float64) for x in (b, ours[k]))
        diffs.append(float(np.abs(a - c).mean()))
    return {"same_bytes": round(same / len(theirs), 3), "mean_abs_diff": round(float(np.mean(diffs)), 3)}


def run_score(tool: str, score: Dict[str, Any], peer_py: Path, rep: int) -> Tuple[float, Optional[float]]:
    out = WORK / "out" / f"{tool}-score"
    shutil.rmtree(out, ignore_errors=True)
    log = WORK / "logs" / f"{tool}-score-{rep}.log"
    if tool == "pixelmill":
        cmd = [PROJECT_PY, "-m", "pipeline", "score", "--data", str(score["data"]), "--model", str(score["model"]),
               "--output", str(out), "--split", "all", "--mode", "overwrite", "--config", "conf/local.yaml",
               *_sets(SPARK_SETS)]
        secs = run_logged(cmd, project_env(), log)
        where = pixelmill_dir(out) / "predictions"
        inner: Optional[float] = float(last_json(log)["timings"]["total_s"])
    else:
        cmd = [str(peer_py), str(PEER_SCRIPTS / "ray_score.py"), "--data", str(pixelmill_dir(score["data"]) / "images"),
               "--model-dir", str(score["model"]), "--output", str(out), "--cpus", str(CPUS)]
        secs, where, inner = run_logged(cmd, peer_env(), log), out, None
    got = predictions(where)
    if len(got) != score["rows"]:
        raise SystemExit(f"bench/peers: {tool} scored {len(got)} distinct images under {where}, expected {score['rows']}")
    return secs, inner


def agreement(a: Dict[str, int], b: Dict[str, int]) -> float:
    return sum(1 for k, v in a.items() if b.get(k) == v) / max(1, len(a))


# --- main ------------------------------------------------------------------------------------------

def _stats(xs: List[float]) -> Dict[str, float]:
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2)}


def main() -> int:
    t0 = time.perf_counter()
    peer_py = ensure_peer_venv()
    datasets = prepare_datasets()
    score = prepare_scoring(datasets[0], project_env())
    print(f"ready in {time.perf_counter() - t0:.0f}s: {', '.join(f'{d.name} {d.files} files' for d in datasets)}, "
          f"scoring {score['rows']} rows; {REPEATS} round(s){' (quick)' if QUICK else ''}", flush=True)
    jobs = {d.name: ingest_jobs(d, peer_py) for d in datasets}
    times: Dict[str, List[float]] = {}
    inside: Dict[str, List[float]] = {}  # pixelmill: seconds inside <stage>.run, from its summary
    loads: List[float] = [os.getloadavg()[0]]
    for rep in range(REPEATS):
        for ds in datasets:
            for tool, job in jobs[ds.name].items():
                secs, inner = run_ingest(tool, job, ds, rep)
                times.setdefault(f"{tool}/{ds.name}", []).append(secs)
                if inner is not None:
                    inside.setdefault(f"{tool}/{ds.name}", []).append(inner)
                print(f"round {rep + 1}: {tool:<17}{ds.name:<9}{secs:8.1f} s  load {os.getloadavg()[0]:.1f}", flush=True)
        for tool in ("pixelmill", "ray"):
            secs, inner = run_score(tool, score, peer_py, rep)
            times.setdefault(f"{tool}/score", []).append(secs)
            if inner is not None:
                inside.setdefault(f"{tool}/score", []).append(inner)
            print(f"round {rep + 1}: {tool + ' score':<17}{'fashion':<9}{secs:8.1f} s  load {os.getloadavg()[0]:.1f}",
                  flush=True)
        loads.append(os.getloadavg()[0])
    agree = agreement(predictions(pixelmill_dir(WORK / "out" / "pixelmill-score") / "predictions"), predictions(WORK / "out" / "ray-score"))
    if agree < 0.99:
        raise SystemExit(f"bench/peers: pixelmill and Ray Data predicted the same class for only {agree:.3f} of the images")
    alike = {f"{peer}_{d.name}": compare_images(WORK / "out" / f"{peer}-{d.name}", WORK / "out" / f"pixelmill-{d.name}")
             for peer in ("ray", "daft") for d in datasets}
    for d in datasets:
        if alike[f"ray_{d.name}"]["same_bytes"] < 1.0:
            print(f"WARNING: the Ray Data peer no longer stores the same bytes as pixelmill for {d.name} "
                  f"({alike[f'ray_{d.name}']}): bring bench/peers/ray_ingest.py's clean() in line with "
                  "pipeline/images.py, or the comparison is of different work", flush=True)

    stats = {k: _stats(v) for k, v in times.items()}
    med = {k: v["median"] for k, v in stats.items()}
    files = {d.name: d.files for d in datasets}
    files["score"] = score["rows"]
    run_med = {k: round(statistics.median(v), 2) for k, v in inside.items()}
    print(f"\n{'job':<19}{'dataset':<9}{'images':>8}{'median s':>10}{'min s':>8}{'max s':>8}{'images/s':>10}"
          f"{'in run() s':>12}")
    for key, s in stats.items():
        tool, name = key.split("/")
        label = {"pixelmill_submit": "pixelmill (submit)"}.get(tool, tool)
        print(f"{label:<19}{name:<9}{files[name]:>8}{s['median']:>10.1f}{s['min']:>8.1f}{s['max']:>8.1f}"
              f"{files[name] / s['median']:>10.1f}{run_med[key] if key in run_med else '':>12}")
    print("\nstored images vs pixelmill's (same bytes, mean abs pixel diff): "
          + ", ".join(f"{k} {v['same_bytes']} / {v['mean_abs_diff']}" for k, v in alike.items()))
    ratios = {f"ratio_vs_{peer}_{d}": round(med[f"{peer}/{d}"] / med[f"pixelmill/{d}"], 3)
              for peer in ("ray", "daft") for d in ("fashion", "photos")}
    ratios["ratio_vs_ray_score"] = round(med["ray/score"] / med["pixelmill/score"], 3)
    print("\npeer seconds / pixelmill seconds (> 1: pixelmill faster): "
          + ", ".join(f"{k[len('ratio_vs_'):]} {v}" for k, v in ratios.items())
          + f"; predictions agree on {agree:.4f}; load avg 1m {[round(x, 1) for x in loads]}")
    summary: Dict[str, Any] = {
        "benchmark": "peers", "quick": QUICK, "repeats": REPEATS, "cpus": CPUS, "cores": os.cpu_count(),
        "files_fashion": files["fashion"], "files_photos": files["photos"], "score_rows": files["score"],
        "peers": " ".join(p for p in PEER_PINS if p.startswith(("ray", "daft", "tensorflow"))),
        **ratios,
        **{f"{k.replace('/', '_')}_s": v for k, v in med.items()},
        **{f"{k.replace('/', '_')}_in_run_s": v for k, v in run_med.items()},
        **{f"{k}_same_bytes": v["same_bytes"] for k, v in alike.items()},
        **{f"{k}_mean_abs_diff": v["mean_abs_diff"] for k, v in alike.items()},
        "score_agreement": round(agree, 4),
        "load_avg_1m": [round(x, 2) for x in loads],
        "ratio": min(ratios[f"ratio_vs_{p}_{d}"] for p in ("ray", "daft") for d in ("fashion", "photos")),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

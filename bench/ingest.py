"""Benchmark: the Spark ingest job vs a plain 2-process Python loop doing the same per-image work.

    .venv/bin/python bench/ingest.py

Prepares its own data in ``bench/.cache/`` (git-ignored), once:

* ``fashion``: 20,000 real Fashion-MNIST images (Debian ``dataset-fashion-mnist``,
  IDX gz) written as 28x28 grayscale PNGs in class folders; ingested to 28x28 L PNG.
* ``photos``: 2,000 real photos as ~500x375 JPEGs, cut (random scale, offset, flip)
  from the photos bundled in the scikit-image wheel (downloaded with
  ``pip download --no-deps``, read as a zip, never installed); ingested to 224x224 RGB PNG.

Per dataset it measures, in this process, side by side:

* **plain**: ``multiprocessing.Pool(2)`` over the files, each worker reading the bytes and
  running the same work as the Spark job (sha256, :func:`pipeline.ingest.layout.place`,
  :func:`pipeline.imaging.clean.clean_image`: validate/normalise/resize/re-encode, pixel sums);
  results returned to the parent (no Parquet written: the baseline is the per-image work alone);
* **spark**: ``pipeline.ingest.run`` end to end on ``local[2]`` (warm session: listing,
  cleaning, dedup, shuffle within split, Parquet write, reconcile, commit).

* **floor**: the least a job built this way can cost: the job's own extract step
  (:mod:`pipeline.ingest.extract`: listing, scan sizing, ``clean_batches`` in ``mapInPandas``),
  output discarded (``noop`` sink): no duplicate resolution, no Parquet, no reconcile.
  ``ratio_floor`` = floor / plain bounds ``ratio`` from above: the target is out of reach for any such job when ``ratio_floor`` is below it.

Each is run ``REPEATS`` times (default 3), alternating plain/spark/floor so all see the same machine
load (other jobs share the 2 cores); the median of each is reported, with the load average. The last line of
output is one JSON object with the figures and ``ratio`` (Spark / plain, the smaller of the two
datasets' ratios), plus ``ratio_fashion`` and ``ratio_photos``.
"""
from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from pipeline import sample_data

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
FASHION_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
N_FASHION = 20_000
N_PHOTOS = 2_000
PHOTO_SOURCES = ("astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "hubble_deep_field.jpg",
                 "retina.jpg", "motorcycle_left.png", "ihc.png", "color.png", "grass.png")
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
PROCS = 2

log = logging.getLogger("bench.ingest")


# --- data ------------------------------------------------------------------------------------

def prepare_fashion() -> Path:
    root = CACHE / "fashion_png"
    done = root / ".complete"
    if done.is_file():
        return root
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    images, labels = sample_data.load_split(sample_data.locate_fashion_mnist(CACHE), "train")
    for c in FASHION_CLASSES:
        (root / "data" / c).mkdir(parents=True, exist_ok=True)
    for i in range(N_FASHION):
        Image.fromarray(images[i], "L").save(root / "data" / FASHION_CLASSES[labels[i]] / f"{i:05d}.png")
    done.write_text("ok\n")
    return root


def _skimage_wheel() -> Path:
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob("scikit_image-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        log.info("downloading the scikit-image wheel (its bundled photos only) into %s", wheels)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "scikit-image", "-d", str(wheels)], check=True)
        found = sorted(wheels.glob("scikit_image-*.whl"))
    return found[-1]


def prepare_photos() -> Path:
    root = CACHE / "photos_jpg"
    done = root / ".complete"
    if done.is_file():
        return root
    from PIL import Image

    shutil.rmtree(root, ignore_errors=True)
    sources = []
    with zipfile.ZipFile(_skimage_wheel()) as z:
        for name in PHOTO_SOURCES:
            with z.open(f"skimage/data/{name}") as f:
                sources.append((Path(name).stem, Image.open(io.BytesIO(f.read())).convert("RGB")))
    rng = np.random.default_rng(0)
    tw, th = 500, 375
    for i in range(N_PHOTOS):
        label, img = sources[i % len(sources)]
        w, h = img.size
        s = max(tw / w, th / h) * float(rng.uniform(1.0, 1.6))
        scaled = img.resize((max(tw, round(w * s)), max(th, round(h * s))), Image.Resampling.BILINEAR)
        x = int(rng.integers(0, scaled.width - tw + 1))
        y = int(rng.integers(0, scaled.height - th + 1))
        crop = scaled.crop((x, y, x + tw, y + th))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        d = root / "data" / label
        d.mkdir(parents=True, exist_ok=True)
        crop.save(d / f"{i:05d}.jpg", "JPEG", quality=90)
    done.write_text("ok\n")
    return root


# --- the plain baseline ----------------------------------------------------------------------

_CTX: Dict[str, Any] = {}


def _init_worker(opts: Any, root_uri: str, fractions: Dict[str, float], seed: int) -> None:
    _CTX.update(opts=opts, where=dict(root_uri=root_uri, label_source="folders", fractions=fractions, seed=seed))


def _plain_one(path: str) -> Tuple[str, str, str, Any]:
    from pipeline.imaging import clean as imc
    from pipeline.ingest import layout

    with open(path, "rb") as f:
        data = f.read()
    uri = "file://" + path
    iid = imc.image_id(data)
    split, label = layout.place(uri, iid, **_CTX["where"])
    r = imc.clean_image(data, uri, _CTX["opts"])
    return iid, split, label or "", (r.image if isinstance(r, imc.Cleaned) else r.reason)


def run_plain(files: Sequence[str], cfg: Any, root_uri: str) -> Dict[str, Any]:
    from pipeline.imaging.clean import ImageOptions

    opts = ImageOptions.from_config(cfg.ingest)
    t = time.perf_counter()
    with mp.get_context("fork").Pool(PROCS, _init_worker,
                                     (opts, root_uri, dict(cfg.ingest.split_fractions), cfg.ingest.seed)) as pool:
        out = pool.map(_plain_one, files, chunksize=64)
    dt = time.perf_counter() - t
    ok = sum(1 for o in out if isinstance(o[3], bytes))
    return {"seconds": round(dt, 3), "images_per_second": round(len(files) / dt, 1), "accepted": ok}


# --- the Spark job -------------------------------------------------------------------------

def run_spark(spark: Any, cfg: Any, root: Path, out: Path) -> Dict[str, Any]:
    from pipeline import ingest

    t = time.perf_counter()
    s = ingest.run(spark, cfg, input_uri="file://" + str(root), output_uri="file://" + str(out), mode="overwrite")
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 3), "images_per_second": round(s["files_seen"] / dt, 1), "accepted": s["accepted"],
            "timings": s["timings"]}


def run_floor(spark: Any, cfg: Any, root: Path) -> Dict[str, Any]:
    """The least any binaryFile + mapInPandas ingest costs: list, scan and the same per-image function, no sink.

    The job's own extract step (:mod:`pipeline.ingest.extract`: the listing, the scan sizing and
    :func:`~pipeline.ingest.extract.clean_batches`), output discarded (Spark's ``noop`` sink): no
    duplicate resolution, no Parquet, no reconcile, no commit. What the job spends beyond this is
    its own overhead; what this spends beyond the plain loop is reading files through Spark and
    moving them through Arrow to Python workers.
    """
    from pipeline.imaging.clean import ImageOptions
    from pipeline.ingest import extract
    from pipeline.spark import task_slots, temporary_confs

    t = time.perf_counter()
    input_uri = "file://" + str(root)
    icfg = cfg.ingest
    listing = extract.list_input(spark, input_uri)
    confs = extract.scan_confs(listing.files_seen, listing.input_bytes, task_slots(spark), icfg.batch_rows)
    with temporary_confs(spark, confs):
        fn = extract.clean_batches(ImageOptions.from_config(icfg), root_uri=input_uri, label_source="folders",
                                   fractions=icfg.split_fractions, seed=icfg.seed)
        (extract.scanned(listing.raw, fn, max_bytes=icfg.max_file_mb * 1024 * 1024)
         .write.format("noop").mode("overwrite").save())
    dt = time.perf_counter() - t
    return {"seconds": round(dt, 3), "images_per_second": round(listing.files_seen / dt, 1)}


def bench_dataset(spark: Any, name: str, root: Path, overrides: List[str]) -> Dict[str, Any]:
    from pipeline.config import load_config

    cfg = load_config(["local.yaml"], [*BASE_OVERRIDES, *overrides])
    data = root / "data"
    files = sorted(str(p) for p in data.rglob("*") if p.is_file())
    out = CACHE / "out" / name
    plain: List[Dict[str, Any]] = []
    sparks: List[Dict[str, Any]] = []
    floors: List[Dict[str, Any]] = []
    for rep in range(REPEATS):
        plain.append(run_plain(files, cfg, "file://" + str(data)))
        print(f"[{name}] run {rep + 1}: plain {plain[-1]['images_per_second']:>8.1f} img/s", flush=True)
        sparks.append(run_spark(spark, cfg, data, out))
        print(f"[{name}] run {rep + 1}: spark {sparks[-1]['images_per_second']:>8.1f} img/s  {sparks[-1]['timings']}",
              flush=True)
        floors.append(run_floor(spark, cfg, data))
        print(f"[{name}] run {rep + 1}: floor {floors[-1]['images_per_second']:>8.1f} img/s  (scan + per-image work, no sink)",
              flush=True)
    assert {r["accepted"] for r in plain} == {r["accepted"] for r in sparks}, (plain, sparks)
    mp_ = statistics.median(r["images_per_second"] for r in plain)
    ms = statistics.median(r["images_per_second"] for r in sparks)
    mf = statistics.median(r["images_per_second"] for r in floors)
    ratios = [s["images_per_second"] / p["images_per_second"] for p, s in zip(plain, sparks)]
    return {"files": len(files), "plain_ips": round(mp_, 1), "spark_ips": round(ms, 1), "floor_ips": round(mf, 1),
            "ratio": round(ms / mp_, 3), "ratio_floor": round(mf / mp_, 3), "round_ratios": [round(r, 3) for r in ratios],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


BASE_OVERRIDES = ["spark.ui_enabled=false", "spark.log_level=ERROR", "spark.master=local[2]"]


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    from pipeline.config import load_config
    from pipeline.spark import build_session

    t = time.perf_counter()
    fashion, photos = prepare_fashion(), prepare_photos()
    print(f"data ready in {time.perf_counter() - t:.1f}s: {fashion}, {photos}", flush=True)
    spark = build_session(load_config(["local.yaml"], BASE_OVERRIDES).spark, app_suffix="bench-ingest")
    try:
        # warm-up: JVM JIT, Python workers, imports
        from pipeline import ingest

        warm = CACHE / "warm"
        shutil.rmtree(warm, ignore_errors=True)
        for i, p in enumerate(sorted((fashion / "data" / "bag").glob("*.png"))[:200]):
            (warm / "bag").mkdir(parents=True, exist_ok=True)
            shutil.copy(p, warm / "bag" / p.name)
        ingest.run(spark, load_config(["local.yaml"], [*BASE_OVERRIDES, "ingest.max_train_procs=1"]),
                   input_uri="file://" + str(warm), output_uri="file://" + str(CACHE / "out" / "warm"), mode="overwrite")
        res = {
            "fashion": bench_dataset(spark, "fashion", fashion, [
                "ingest.height=28", "ingest.width=28", "ingest.color_mode=L", "ingest.encode_format=png"]),
            "photos": bench_dataset(spark, "photos", photos, [
                "ingest.height=224", "ingest.width=224", "ingest.color_mode=RGB", "ingest.encode_format=png"]),
        }
    finally:
        spark.stop()
    print()
    print(f"{'dataset':<10}{'files':>8}{'plain img/s':>14}{'spark img/s':>14}{'ratio':>8}{'floor img/s':>14}{'floor ratio':>13}")
    for k, v in res.items():
        print(f"{k:<10}{v['files']:>8}{v['plain_ips']:>14.1f}{v['spark_ips']:>14.1f}{v['ratio']:>8.3f}"
              f"{v['floor_ips']:>14.1f}{v['ratio_floor']:>13.3f}")
    summary = {
        "benchmark": "ingest", "cores": os.cpu_count(), "processes": PROCS, "repeats": REPEATS,
        "fashion_plain_ips": res["fashion"]["plain_ips"], "fashion_spark_ips": res["fashion"]["spark_ips"],
        "photos_plain_ips": res["photos"]["plain_ips"], "photos_spark_ips": res["photos"]["spark_ips"],
        "ratio_fashion": res["fashion"]["ratio"], "ratio_photos": res["photos"]["ratio"],
        "fashion_floor_ips": res["fashion"]["floor_ips"], "photos_floor_ips": res["photos"]["floor_ips"],
        "ratio_floor_fashion": res["fashion"]["ratio_floor"], "ratio_floor_photos": res["photos"]["ratio_floor"],
        "round_ratios_fashion": res["fashion"]["round_ratios"], "round_ratios_photos": res["photos"]["round_ratios"],
        "load_avg_1m": [res["fashion"]["load_avg_1m"], res["photos"]["load_avg_1m"]],
        "ratio": min(res["fashion"]["ratio"], res["photos"]["ratio"]),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

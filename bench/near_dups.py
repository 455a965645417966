"""Benchmark: near-duplicates on real data, and what finding them costs the ingest.

    .venv/bin/python bench/near_dups.py            # all three parts
    .venv/bin/python bench/near_dups.py leaks cost scaling   # or some of them
    .venv/bin/python bench/near_dups.py accuracy             # after make demo

Data: Fashion-MNIST (Debian ``dataset-fashion-mnist``), 70,000 real 28x28 images.

* **leaks**: the pHash of every image (:func:`pipeline.imaging.quality.phash`, what ingest
  stores), then for each official test image the smallest Hamming distance to any training
  image (the block-LSH pairs of :mod:`pipeline.ingest.near_dups` at distance 6, plus equal
  hashes): how many test images have a near-duplicate in train at each distance 0..6.
* **cost**: the demo's ingest (all 70,000 files exported as PNGs in train/ and test/ class
  folders, ``conf/fashion_mnist.yaml``) as users run it: one cold ``python -m pipeline
  ingest`` process per run, start-up included, alternating ``ingest.near_duplicates: off``
  (hashes and flags still computed) with the default ``same_split`` at the default distance.
  ``ratio`` = median wall time with / without (target <= 1.10).
* **scaling**: :func:`pipeline.ingest.near_dups.with_near_dup_groups` alone (the pairing,
  on the driver at these sizes, the union-find, the join back) on 20,000, 70,000 and 210,000 hashes, the last two thirds
  from the real images flipped left-right and shifted by 2 pixels (distinct images), on a
  warm ``local[2]`` session: seconds and microseconds per image at each size.

* **accuracy** (only when named, after ``make demo``): the demo model's test accuracy
  (``work/demo/scores``, or ``PIXELMILL_WORK``) on all official test images and on the
  leak-free part of them: the test images without a train or val image within pHash distance
  ``d`` (the stored ``phash`` column of ``work/demo/ingest``), for ``d`` = 0..6.

Ends with one JSON line (``ratio`` and the figures).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
REPEATS = int(os.environ.get("BENCH_REPEATS", "2"))
MAX_DISTANCE = 6


def _hashes(images: np.ndarray) -> np.ndarray:
    from PIL import Image

    from pipeline.imaging.quality import phash

    return np.fromiter((phash(Image.fromarray(a)) for a in images), dtype=np.int64, count=len(images))


def _fashion():
    from pipeline.sample_data import load_split, locate_fashion_mnist

    src = locate_fashion_mnist()
    return load_split(src, "train")[0], load_split(src, "test")[0]


def _session():
    from pipeline.config import load_config
    from pipeline.spark import build_session

    cfg = load_config(["local.yaml"], ["spark.ui_enabled=false", "spark.log_level=ERROR"])
    return build_session(cfg.spark)


def leaks(spark) -> Dict[str, Any]:
    from pyspark.sql import functions as F

    from pipeline.ingest.near_dups import hash_pairs

    train, test = _fashion()
    t = time.perf_counter()
    h_train, h_test = _hashes(train), _hashes(test)
    hash_s = time.perf_counter() - t
    df = spark.createDataFrame(
        [(int(h), "train") for h in h_train] + [(int(h), "test") for h in h_test], "phash long, split string")
    distinct = df.select("phash").distinct()
    pairs = hash_pairs(distinct, distance=MAX_DISTANCE)
    both = pairs.select("a", "b", "distance").unionByName(pairs.select(F.col("b").alias("a"), F.col("a").alias("b"), "distance"))
    train_hashes = df.filter(F.col("split") == "train").select(F.col("phash").alias("b")).distinct()
    near = both.join(train_hashes, "b").groupBy("a").agg(F.min("distance").alias("d"))
    equal = train_hashes.select(F.col("b").alias("a"), F.lit(0).alias("d"))
    best = near.unionByName(equal).groupBy("a").agg(F.min("d").alias("d"))
    per_test = (df.filter(F.col("split") == "test").join(best, df["phash"] == best["a"], "left")
                .groupBy("d").count().collect())
    at = {int(r["d"]): int(r["count"]) for r in per_test if r["d"] is not None}
    cumulative = {f"test_with_train_neighbour_d{d}": sum(n for k, n in at.items() if k <= d)
                  for d in range(MAX_DISTANCE + 1)}
    return {"test_images": int(len(h_test)), "train_images": int(len(h_train)),
            "phash_us_per_image": round(1e6 * hash_s / (len(h_train) + len(h_test)), 1), **cumulative}


def _export() -> Path:
    from pipeline.sample_data import export_class_folders

    dest = CACHE / "fashion70k"
    export_class_folders(dest)
    return dest


def _ingest_once(src: Path, out: Path, policy: str) -> float:
    cmd = [sys.executable, "-m", "pipeline", "ingest", "--input", str(src), "--output", str(out), "--mode",
           "overwrite", "--config", "local.yaml", "--config", "fashion_mnist.yaml",
           "--set", "spark.ui_enabled=false", "--set", f"ingest.near_duplicates={policy}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"bench/near_dups.py: ingest failed ({policy}): {proc.stderr.strip().splitlines()[-1:]}")
    return wall


def cost() -> Dict[str, Any]:
    src = _export()
    out = CACHE / "near_dups_out"
    walls: Dict[str, List[float]] = {"off": [], "same_split": []}
    for _ in range(REPEATS):
        for policy in ("off", "same_split"):
            walls[policy].append(round(_ingest_once(src, out, policy), 2))
    from pipeline.contracts import read_manifest

    manifest = read_manifest(out.as_uri())  # the last run: same_split
    near = manifest["quality"]["near_duplicates"]
    off, on = statistics.median(walls["off"]), statistics.median(walls["same_split"])
    return {"ratio": round(on / off, 3), "ingest_off_s": walls["off"], "ingest_same_split_s": walls["same_split"],
            "files": manifest["files_seen"], "distance": near["distance"], "groups": near["groups"],
            "images_in_groups": near["images_in_groups"], "oversized_groups": near["oversized_groups"],
            "moved": near["moved"], "cross_split_groups": near["cross_split_groups"],
            "leaked_images": near["leaked_images"], "flags": manifest["quality"]["flags"]}


def scaling(spark) -> Dict[str, Any]:
    from pipeline.ingest.near_dups import with_near_dup_groups

    train, test = _fashion()
    real = np.concatenate([train, test])
    variants = [real, real[:, :, ::-1], np.roll(real, 2, axis=2)]
    hashes = np.concatenate([_hashes(v) for v in variants])
    out: Dict[str, Any] = {}
    for n in (20_000, 70_000, 210_000):
        df = spark.createDataFrame([(f"{i:08d}", int(h)) for i, h in enumerate(hashes[:n])],
                                   "image_id string, phash long").repartition(4).cache()
        df.count()
        t = time.perf_counter()
        rows = with_near_dup_groups(df, distance=4, max_group=64).filter("near_dup_group is not null").count()
        s = time.perf_counter() - t
        df.unpersist()
        out[f"groups_s_{n // 1000}k"] = round(s, 2)
        out[f"groups_us_per_image_{n // 1000}k"] = round(1e6 * s / n, 1)
        out[f"in_groups_{n // 1000}k"] = int(rows)
    return out


def accuracy(spark) -> Dict[str, Any]:
    from pyspark.sql import functions as F

    from pipeline.commit import version_root
    from pipeline.ingest.near_dups import hash_pairs

    work = Path(os.environ.get("PIXELMILL_WORK", REPO / "work" / "demo"))
    images = spark.read.parquet(version_root(str(work / "ingest")) + "/images").select("image_id", "split", "phash")
    preds = spark.read.parquet(version_root(str(work / "scores")) + "/predictions").select(
        "image_id", "label", "pred_label")
    pairs = hash_pairs(images.select("phash").distinct(), distance=MAX_DISTANCE)
    both = pairs.select("a", "b", "distance").unionByName(
        pairs.select(F.col("b").alias("a"), F.col("a").alias("b"), "distance"))
    seen = images.filter(F.col("split") != "test").select(F.col("phash").alias("b")).distinct()
    nearest = (both.join(seen, "b").groupBy("a").agg(F.min("distance").alias("d"))
               .unionByName(seen.select(F.col("b").alias("a"), F.lit(0).alias("d")))
               .groupBy("a").agg(F.min("d").alias("d")))
    test = (images.filter(F.col("split") == "test").join(preds, "image_id")
            .join(nearest, images["phash"] == nearest["a"], "left")
            .select((F.col("label") == F.col("pred_label")).cast("int").alias("ok"), "d").collect())
    out: Dict[str, Any] = {"test_scored": len(test),
                           "test_accuracy": round(sum(r["ok"] for r in test) / len(test), 4)}
    for d in range(MAX_DISTANCE + 1):
        clean = [r["ok"] for r in test if r["d"] is None or r["d"] > d]
        out[f"leak_free_test_images_d{d}"] = len(clean)
        out[f"leak_free_test_accuracy_d{d}"] = round(sum(clean) / len(clean), 4) if clean else None
        leaked = [r["ok"] for r in test if r["d"] is not None and r["d"] <= d]
        out[f"leaked_test_accuracy_d{d}"] = round(sum(leaked) / len(leaked), 4) if leaked else None
    return out


def main(argv: List[str]) -> int:
    parts = argv or ["leaks", "cost", "scaling"]
    result: Dict[str, Any] = {"bench": "near_dups", "load_avg_1m": round(os.getloadavg()[0], 2)}
    if "cost" in parts:  # first: cold processes, no session of ours alive
        result.update(cost())
    if {"leaks", "scaling", "accuracy"} & set(parts):
        spark = _session()
        if "accuracy" in parts:
            result.update(accuracy(spark))
        if "leaks" in parts:
            result.update(leaks(spark))
        if "scaling" in parts:
            result.update(scaling(spark))
        spark.stop()
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print("\n" + json.dumps(result))  # after any progress bar on the same line
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

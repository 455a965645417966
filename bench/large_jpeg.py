"""Ingest's per-image work on 12 MP camera-size JPEGs, with and without reduced-scale decoding.

    .venv/bin/python bench/large_jpeg.py

Phone and camera photos are 12-50 MP. There is no such photo in the repository or in the
packages the project installs, so this makes them: bench/ingest.py's photos (cut from the
photos bundled in the scikit-image wheel) upscaled (bicubic) to 4000x3000 and re-encoded
as JPEG quality 92, 48 files in ``bench/.cache/large_jpeg/`` (built once). Upscaled
pictures are smoother than real 12 MP photos, so they encode smaller; the decode work
per pixel is what matters here and it is the same.

Each measurement is a child process pinned to one core (``sched_setaffinity``) running
ingest's own ``clean_image`` (header checks, EXIF orientation, decode, centre crop and
resize to 224x224 RGB, JPEG encode, stats, quality flags, pHash) over every file:
``full`` with ``ingest.jpeg_reduced_decode=false``, ``reduced`` with it on (the default:
Pillow's JPEG ``draft`` picks the smallest DCT scale, here 1/8, that still covers
224x224). Alternating rounds, medians. The last line is JSON; ``ratio`` = reduced / full
images/s per core.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache" / "large_jpeg"
QUICK = os.environ.get("PIXELMILL_BENCH_QUICK") == "1"
N_FILES = 6 if QUICK else 48
ROUNDS = 1 if QUICK else 3
SIZE = (4000, 3000)


def prepare() -> List[Path]:
    done = CACHE / ".complete"
    if done.is_file():
        return sorted(CACHE.glob("*.jpg"))
    from PIL import Image

    spec = importlib.util.spec_from_file_location("bench_ingest", REPO / "bench" / "ingest.py")
    bench_ingest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_ingest)
    sources = sorted((bench_ingest.prepare_photos() / "data").rglob("*.jpg"))
    CACHE.mkdir(parents=True, exist_ok=True)
    step = max(1, len(sources) // N_FILES)
    for i, src in enumerate(sources[::step][:N_FILES]):
        with Image.open(src) as im:
            im.convert("RGB").resize(SIZE, Image.Resampling.BICUBIC).save(CACHE / f"{i:03d}.jpg", "JPEG", quality=92)
    done.write_text("ok\n")
    return sorted(CACHE.glob("*.jpg"))


def child(reduced: bool) -> Dict[str, Any]:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from pipeline.imaging.clean import Cleaned, ImageOptions, clean_image

    files = sorted(CACHE.glob("*.jpg"))
    blobs = [(str(f), f.read_bytes()) for f in files]
    opts = ImageOptions(height=224, width=224, color_mode="RGB", encode_format="jpeg", jpeg_quality=90,
                        jpeg_reduced_decode=reduced)
    clean_image(blobs[0][1], blobs[0][0], opts)  # imports and first-call set-up out of the timing
    t0, c0 = time.perf_counter(), time.process_time()
    ok = sum(isinstance(clean_image(data, path, opts), Cleaned) for path, data in blobs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": len(blobs) / wall, "cpu_s_per_image": cpu / len(blobs), "accepted": ok,
            "files": len(blobs), "mb_per_file": sum(len(d) for _, d in blobs) / len(blobs) / 2**20}


def run_child(reduced: bool) -> Dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", "1" if reduced else "0"],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2] == "1")))
        return 0
    files = prepare()
    print(f"{len(files)} JPEGs of {SIZE[0]}x{SIZE[1]} in {CACHE}", flush=True)
    res: Dict[str, List[Dict[str, Any]]] = {"full": [], "reduced": []}
    for r in range(ROUNDS):
        for name in ("full", "reduced"):
            out = run_child(name == "reduced")
            res[name].append(out)
            print(f"round {r + 1} {name:8s} {json.dumps(out)}", flush=True)
    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in res.items()}
    for k in ("full", "reduced"):
        assert all(x["accepted"] == x["files"] for x in res[k]), f"{k}: not every file was accepted"
    print(f"\n12 MP JPEG -> 224x224 RGB JPEG, one core: full decode {med['full']:.1f} images/s, "
          f"reduced-scale decode {med['reduced']:.1f} images/s ({med['reduced'] / med['full']:.1f}x)")
    print(json.dumps({
        "benchmark": "large_jpeg", "files": len(files), "size": f"{SIZE[0]}x{SIZE[1]}",
        "mb_per_file": round(res["full"][0]["mb_per_file"], 2), "rounds": ROUNDS,
        "full_images_per_s_per_core": round(med["full"], 2),
        "reduced_images_per_s_per_core": round(med["reduced"], 2),
        "full_rounds": [round(x["images_per_s"], 2) for x in res["full"]],
        "reduced_rounds": [round(x["images_per_s"], 2) for x in res["reduced"]],
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "ratio": round(med["reduced"] / med["full"], 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

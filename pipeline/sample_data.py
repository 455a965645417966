"""Real sample data that works offline: Fashion-MNIST from Debian's ``dataset-fashion-mnist``.

70,000 real 28x28 grayscale images in 10 classes (MIT licence), shipped as IDX
files. :func:`locate_fashion_mnist` finds or obtains them (installed package;
``apt-get install`` as root; else ``apt-get download`` + ``dpkg -x`` into a
cache folder); :func:`export_class_folders` writes them as PNG files in the
layout ingest reads: ``<dest>/<train|test>/<class>/<n>.png``.

``python -m pipeline.sample_data DEST [--limit N]`` does both.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from pipeline.errors import PixelmillError

log = logging.getLogger(__name__)

PACKAGE = "dataset-fashion-mnist"
INSTALLED_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for pair in FILES.values() for f in pair)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PIXELMILL_CACHE", Path.home() / ".cache" / "pixelmill"))


def locate_fashion_mnist(cache_dir: Optional[Path] = None) -> Path:
    """The folder holding Fashion-MNIST's four IDX ``.gz`` files, obtaining them if needed."""
    if _complete(INSTALLED_DIR):
        return INSTALLED_DIR
    cache_dir = Path(cache_dir or default_cache_dir())
    extracted = cache_dir / "fashion-mnist-deb" / INSTALLED_DIR.relative_to("/")
    if _complete(extracted):
        return extracted
    errors = []
    if shutil.which("apt-get") and os.geteuid() == 0:
        log.info("installing Debian package %s", PACKAGE)
        for cmd in (["apt-get", "install", "-y", "-qq", PACKAGE], ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", PACKAGE]):
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            if cmd[1] == "install" and r.returncode == 0 and _complete(INSTALLED_DIR):
                return INSTALLED_DIR
            if r.returncode != 0:
                errors.append(f"{' '.join(cmd)}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    if shutil.which("apt-get") and shutil.which("dpkg"):
        log.info("downloading Debian package %s into %s", PACKAGE, cache_dir)
        with tempfile.TemporaryDirectory(dir=cache_dir if cache_dir.exists() else None) as tmp:
            r = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if r.returncode == 0 and debs:
                target = cache_dir / "fashion-mnist-deb"
                target.mkdir(parents=True, exist_ok=True)
                subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True)
                if _complete(extracted):
                    return extracted
            errors.append(f"apt-get download: {(r.stderr.strip().splitlines() or ['no .deb'])[-1]}")
    raise PixelmillError(
        f"could not obtain Fashion-MNIST: install the Debian package ({'sudo ' if os.geteuid() else ''}apt-get install "
        f"{PACKAGE}) or copy its four IDX files into {extracted}" + (f" [{'; '.join(errors)}]" if errors else "")
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX (``.gz``) file into a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise PixelmillError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(src: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    images_f, labels_f = FILES[split]
    return read_idx(src / images_f), read_idx(src / labels_f)


def export_class_folders(dest: Path, *, limit: Optional[int] = None, src: Optional[Path] = None,
                         splits: Tuple[str, ...] = ("train", "test")) -> Dict[str, int]:
    """Write Fashion-MNIST as ``dest/<split>/<class>/<n>.png``; skipped when already complete.

    ``limit`` keeps the first N images of each split (balanced enough for tests).
    Returns the number of images per split.
    """
    from PIL import Image

    dest = Path(dest)
    marker = dest / "_EXPORTED.json"
    want = {"limit": limit, "splits": list(splits)}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("request") == want:
            return done["counts"]
    src = src or locate_fashion_mnist()
    counts: Dict[str, int] = {}
    for split in splits:
        images, labels = load_split(src, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        for c in CLASSES:
            (dest / split / c).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(dest / split / CLASSES[lab] / f"{split}_{i:05d}.png", optimize=False)
        counts[split] = int(len(images))
        log.info("exported %d %s images to %s", len(images), split, dest / split)
    marker.write_text(json.dumps({"request": want, "counts": counts}))
    return counts


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.sample_data", description=__doc__.splitlines()[0])
    p.add_argument("dest", help="folder to write <split>/<class>/*.png into")
    p.add_argument("--limit", type=int, default=None, help="first N images of each split")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = export_class_folders(Path(args.dest), limit=args.limit)
    except PixelmillError as e:
        print(f"sample_data: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

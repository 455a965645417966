"""Peer ingest with Ray Data and Pillow (run by bench/peers.py in the peers' venv).

    python bench/peers/ray_ingest.py --input DIR --output DIR --height H --width W --mode L|RGB [--cpus 2]

``read_binary_files`` lists and reads ``DIR/<label>/<file>``; ``map_batches`` does per image
the same Pillow work as pixelmill's ingest (sha256 of the original bytes; decode, with JPEG
decoded at the smallest DCT scale that still covers the target; convert to L/RGB;
EXIF orientation; center-crop resize with Lanczos; re-encode PNG at compress level 1); ``write_parquet``
writes ``image_id``, ``source_path``, ``label``, ``height``, ``width``, ``image``. Ray runs
locally on ``--cpus`` CPUs. Prints one JSON line with the rows processed.
"""
from __future__ import annotations

import hashlib
import io
import math
import sys

# TensorFlow is in this venv only for the scoring peer; an ingest user's venv has none.
# Hidden so that nothing here pays for importing it.
sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]

PNG_LEVEL = 1  # pixelmill's ingest.png_compress_level


def clean(data: bytes, mode: str, tw: int, th: int) -> bytes:
    """Decode, convert, center-crop resize and re-encode one image as PNG."""
    from PIL import Image, ImageOps

    im = Image.open(io.BytesIO(data))
    w, h = im.size
    s = max(tw / w, th / h)
    if im.format == "JPEG":
        im.draft(None, (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
        w, h = im.size
        s = max(tw / w, th / h)
    im = ImageOps.exif_transpose(im) or im
    im = im.convert(mode)
    if (w, h) != (tw, th):
        cw, ch = tw / s, th / s
        left, top = (w - cw) / 2.0, (h - ch) / 2.0
        im = im.resize((tw, th), Image.Resampling.LANCZOS, box=(left, top, left + cw, top + ch), reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


from _args import ingest_parser, on_local_ray  # noqa: E402 - the sibling file; the script's folder is on sys.path


def main(argv: list[str]) -> int:
    p = ingest_parser(__doc__.splitlines()[0])
    p.add_argument("--cpus", type=int, default=2)
    a = p.parse_args(argv)

    import pyarrow as pa
    import ray

    def clean_batch(batch: pa.Table) -> pa.Table:
        blobs = batch.column("bytes").to_pylist()
        paths = batch.column("path").to_pylist()
        n = len(blobs)
        return pa.table({
            "image_id": [hashlib.sha256(b).hexdigest() for b in blobs],
            "source_path": paths,
            "label": [q.rsplit("/", 2)[-2] for q in paths],
            "height": pa.array([a.height] * n, pa.int32()),
            "width": pa.array([a.width] * n, pa.int32()),
            "image": pa.array([clean(b, a.mode, a.width, a.height) for b in blobs], pa.binary()),
        })

    def job() -> None:
        ds = ray.data.read_binary_files(a.input, include_paths=True)
        ds = ds.map_batches(clean_batch, batch_format="pyarrow", batch_size=256)
        ds.write_parquet(a.output)

    return on_local_ray(a.cpus, job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

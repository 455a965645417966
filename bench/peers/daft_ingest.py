"""Peer ingest with Daft's native image functions (run by bench/peers.py in the peers' venv).

    python bench/peers/daft_ingest.py --input DIR --output DIR --height H --width W --mode L|RGB

Lists ``DIR/<label>/<file>``, downloads each file's bytes, decodes it natively in the
requested mode, center-crops it to the target's aspect ratio, resizes it to W x H, re-encodes
it as PNG and writes Parquet (``image_id``, ``source_path``, ``label``, ``height``, ``width``,
``image``). ``image_id`` is the sha256 of the original bytes: Daft's native hashes stop at
sha1, so that one column is a batch Python function (hashlib), as a Daft user would write it.
Prints one JSON line with the rows written.
"""
from __future__ import annotations

import hashlib
import json
import sys

# TensorFlow is in this venv only for the scoring peer; an ingest user's venv has none. Hidden,
# because Daft's literal type checks import it when it is there (5-15 s of a cold run).
sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]


from _args import ingest_parser  # noqa: E402 - the sibling file; the script's folder is on sys.path


def main(argv: list[str]) -> int:
    p = ingest_parser(__doc__.splitlines()[0])
    a = p.parse_args(argv)

    import daft
    from daft import DataType, col
    from daft.functions import (
        crop, decode_image, download, encode_image, image_height, image_width, resize, split_part, to_list, when,
    )

    @daft.func.batch(return_dtype=DataType.string())
    def sha256_hex(data: daft.Series) -> list:
        return [hashlib.sha256(b).hexdigest() for b in data.to_pylist()]

    tw, th = a.width, a.height
    df = daft.from_glob_path(a.input.rstrip("/") + "/**/*")
    df = df.select(col("path").alias("source_path"), download(col("path")).alias("bytes"))
    df = df.with_columns({
        "image_id": sha256_hex(col("bytes")),
        "label": split_part(col("source_path"), "/", -2),
        "decoded": decode_image(col("bytes"), mode=a.mode),
    })
    # Center crop to the target's aspect ratio, then resize: a source wider than the target
    # keeps its full height, a taller one its full width.
    w, h = image_width(col("decoded")).cast(DataType.int64()), image_height(col("decoded")).cast(DataType.int64())
    wider = w * th >= h * tw
    cw = when(wider, h * tw // th).otherwise(w)
    ch = when(wider, h).otherwise(w * th // tw)
    bbox = to_list((w - cw) // 2, (h - ch) // 2, cw, ch)
    out = df.select(
        "image_id", "source_path", "label",
        daft.lit(th).cast(DataType.int32()).alias("height"),
        daft.lit(tw).cast(DataType.int32()).alias("width"),
        encode_image(resize(crop(col("decoded"), bbox), tw, th), "PNG").alias("image"),
    )
    written = out.write_parquet(a.output)
    files = written.to_pydict().get("path", [])
    print(json.dumps({"peer": "daft", "version": daft.__version__, "files_written": len(files)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

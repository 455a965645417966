"""Peer batch scoring with Ray Data and Keras (run by bench/peers.py in the peers' venv).

    python bench/peers/ray_score.py --data DIR --model-dir DIR --output DIR [--cpus 2] [--batch-size 256]

``read_parquet`` reads an ingest output's ``images/`` (``image_id``, ``label``, ``image``);
``map_batches`` runs a callable class on one actor per CPU (half a CPU reserved each, see below): each actor loads ``model.keras``
once (Keras safe mode, TF on one thread as pixelmill's scorer does), then per batch decodes
the PNGs with Pillow, normalises with ``model.json``'s mean/std and predicts; ``write_parquet``
writes ``image_id``, ``label``, ``pred_label``, ``pred_index``, ``probability``.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from _args import on_local_ray  # the sibling file; the script's folder is on sys.path


class Predictor:
    """Loads the model once per actor; maps a batch of encoded images to predictions."""

    def __init__(self, model_dir: str) -> None:
        import numpy as np
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras

        meta = json.loads((Path(model_dir) / "model.json").read_text())
        self.classes = [c for c, _ in sorted(meta["classes"].items(), key=lambda kv: kv[1])]
        self.shape = (meta["image"]["height"], meta["image"]["width"], meta["image"]["channels"])
        self.mean = np.asarray(meta["normalization"]["mean"], np.float32)
        self.std = np.asarray(meta["normalization"]["std"], np.float32)
        self.model = keras.saving.load_model(str(Path(model_dir) / "model" / "model.keras"), safe_mode=True,
                                             compile=False)

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa
        from PIL import Image

        blobs = batch.column("image").to_pylist()
        x = np.empty((len(blobs),) + self.shape, np.float32)
        for i, b in enumerate(blobs):
            with Image.open(io.BytesIO(b)) as im:
                x[i] = np.asarray(im).reshape(self.shape)
        probs = np.asarray(self.model.predict_on_batch((x - self.mean) / self.std))
        idx = probs.argmax(axis=1)
        return pa.table({
            "image_id": batch.column("image_id"),
            "label": batch.column("label"),
            "pred_label": [self.classes[i] for i in idx],
            "pred_index": pa.array(idx, pa.int32()),
            "probability": pa.array(probs[np.arange(len(idx)), idx], pa.float32()),
        })


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="an ingest output's images/ folder")
    p.add_argument("--model-dir", required=True, help="a training --model-dir (model.json, model/model.keras)")
    p.add_argument("--output", required=True)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    a = p.parse_args(argv)

    import ray

    def job() -> None:
        # One actor per CPU, each TF on one thread; each reserves half a CPU, because with a
        # whole one each the listing, read and write tasks (1 CPU each) would wait forever.
        ds = ray.data.read_parquet(a.data, file_extensions=["parquet"]).select_columns(["image_id", "label", "image"])
        ds = ds.map_batches(Predictor, fn_constructor_kwargs={"model_dir": a.model_dir}, batch_format="pyarrow",
                            batch_size=a.batch_size, compute=ray.data.ActorPoolStrategy(size=a.cpus), num_cpus=0.5)
        ds.write_parquet(a.output)

    return on_local_ray(a.cpus, job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

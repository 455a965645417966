"""Transfer benchmark: fine-tuning a warm-started model vs training from scratch on few labels.

Run with no arguments: ``python bench/transfer.py``. Offline: real Fashion-MNIST images from
the Debian package ``dataset-fashion-mnist`` (``pipeline.sample_data``), written as class-folder
PNGs under ``bench/.cache/transfer/`` and ingested by ``pipeline.ingest`` at 28x28 grey.

1. Pretrain ``compact_cnn`` on five classes (t-shirt/top, trouser, pullover, dress, coat: all
   their 30,000 train images) through ``pipeline.train.run`` on 2 Horovod processes.
2. For 20, 50 and 100 labelled train images per class of the other five (sandal, shirt,
   sneaker, bag, ankle boot), train the same model for the same epochs twice:
   * fine-tuned: ``train.init_weights`` = the pretrained model-dir (its classes differ, so the
     backbone is loaded and the head starts fresh), ``train.freeze_epochs`` head-only epochs,
     then the whole model with the backbone at ``train.backbone_lr_multiplier``;
   * from scratch: random weights, no schedule.
3. Test accuracy of each exported ``model.keras`` (loaded with ``safe_mode=True``, fed as the
   model card's normalisation says) on all 5,000 test images of those five classes.

The last line is one JSON object; ``ratio`` = fine-tuned / from-scratch test accuracy at 20
images per class. ``BENCH_QUICK=1`` runs a small version (fewer images and epochs, 20 per class
only) that proves the script works; its line says ``"quick": true``. For sweeps:
``BENCH_PER_CLASS`` (e.g. ``20``), ``BENCH_FREEZE_EPOCHS`` and ``BENCH_BACKBONE_LR_MULTIPLIER``
override the schedule's defaults; the JSON line records the values used.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
CACHE = REPO / "bench" / ".cache" / ("transfer-quick" if QUICK else "transfer")
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)   # t-shirt_top, trouser, pullover, dress, coat
TARGET_CLASSES = (5, 6, 7, 8, 9)     # sandal, shirt, sneaker, bag, ankle_boot
PER_CLASS = (20,) if QUICK else tuple(int(n) for n in os.environ.get("BENCH_PER_CLASS", "20,50,100").split(","))
PRETRAIN_LIMIT = 300 if QUICK else None   # train images per pretraining class (None = all 6,000)
PRETRAIN_EPOCHS = 1 if QUICK else 4
EPOCHS = 2 if QUICK else 20               # fine-tuned and from scratch alike
FREEZE_EPOCHS = 1 if QUICK else int(os.environ.get("BENCH_FREEZE_EPOCHS", "5"))
BACKBONE_LR_MULTIPLIER = float(os.environ.get("BENCH_BACKBONE_LR_MULTIPLIER", "0.1"))
TEST_LIMIT = 500 if QUICK else None       # test images of the five target classes (None = all 5,000)
SMALL_BATCH = 16                          # per process, for the few-label runs


def _config(extra: Sequence[str] = ()) -> Any:
    from pipeline.config import load_config

    return load_config(["local.yaml", "fashion_mnist.yaml"], [
        "spark.ui_enabled=false", "spark.log_level=ERROR", "ingest.max_train_procs=2",
        "loader.normalize=unit", "train.num_proc=2", "train.intra_op_threads=1", "train.inter_op_threads=1",
        "train.early_stopping.patience=10000", "train.restore_best=false", "train.lr_schedule=constant",
        "train.warmup_epochs=1", "loader.workers_count=1", *extra,
    ])


def _write_folders(root: Path, images: Any, labels: Any, classes: Sequence[int], per_class: Any) -> Path:
    """``root/train/<class>/*.png``: the first ``per_class`` images of each class (None = all)."""
    from PIL import Image

    from pipeline.sample_data import CLASSES

    marker = root / "_WRITTEN"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for c in classes:
        idx = [i for i, lab in enumerate(labels) if lab == c][:per_class]
        folder = root / "train" / CLASSES[c]
        folder.mkdir(parents=True)
        for i in idx:
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    marker.write_text("")
    return root


def _ingest(spark: Any, raw: Path, name: str) -> str:
    from pipeline import ingest
    from pipeline.commit import is_committed
    from pipeline.fs import filesystem

    out = CACHE / "ingested" / name
    if not is_committed(filesystem(out.as_uri()), out.as_uri()):
        ingest.run(spark, _config(), input_uri=raw.as_uri(), output_uri=out.as_uri(), mode="overwrite")
    return out.as_uri()


def _test_accuracy(model_dir: Path, images: Any, labels: Any) -> float:
    """Accuracy of ``model_dir``'s exported model on the test images, fed as its model card says."""
    import keras
    import numpy as np

    from pipeline.sample_data import CLASSES

    card = json.loads((model_dir / "model.json").read_text())
    model = keras.saving.load_model(str(model_dir / "model" / "model.keras"), safe_mode=True)
    mean = np.asarray(card["normalization"]["mean"], np.float32)
    std = np.asarray(card["normalization"]["std"], np.float32)
    x = (images[..., None].astype(np.float32) - mean) / std
    want = np.asarray([card["classes"][CLASSES[lab]] for lab in labels])
    probs = model.predict(x, batch_size=500, verbose=0)
    return float((probs.argmax(axis=1) == want).mean())


def _train(spark: Any, data: str, name: str, overrides: Sequence[str]) -> Tuple[Path, Dict[str, Any]]:
    from pipeline import train

    model_dir = CACHE / "models" / name
    shutil.rmtree(model_dir, ignore_errors=True)
    t0 = time.time()
    summary = train.run(spark, _config(overrides), data_uri=data, model_dir=model_dir.as_uri(), mode="overwrite")
    summary["wall_s"] = round(time.time() - t0, 1)
    return model_dir, summary


def main() -> int:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    import numpy as np

    from pipeline.sample_data import load_split, locate_fashion_mnist
    from pipeline.spark import build_session

    t_start = time.time()
    src = locate_fashion_mnist()
    train_x, train_y = load_split(src, "train")
    test_x, test_y = load_split(src, "test")
    keep = np.isin(test_y, TARGET_CLASSES)
    test_x, test_y = test_x[keep][:TEST_LIMIT], test_y[keep][:TEST_LIMIT]

    spark = build_session(_config().spark, app_suffix="bench-transfer")
    results: List[Dict[str, Any]] = []
    try:
        pre_data = _ingest(spark, _write_folders(CACHE / "raw" / "pretrain", train_x, train_y, PRETRAIN_CLASSES,
                                                 PRETRAIN_LIMIT), "pretrain")
        pre_dir, pre = _train(spark, pre_data, "pretrained", [f"train.epochs={PRETRAIN_EPOCHS}"])
        print(f"pretrained on 5 classes: val_accuracy {pre['metrics'].get('val_accuracy', float('nan')):.4f}, "
              f"{pre['wall_s']} s", flush=True)
        common = [f"train.epochs={EPOCHS}", f"train.batch_size={SMALL_BATCH}"]
        tuned = [f"train.init_weights={pre_dir.as_uri()}", f"train.freeze_epochs={FREEZE_EPOCHS}",
                 f"train.backbone_lr_multiplier={BACKBONE_LR_MULTIPLIER}"]
        for n in PER_CLASS:
            data = _ingest(spark, _write_folders(CACHE / "raw" / f"target-{n}", train_x, train_y, TARGET_CLASSES, n),
                           f"target-{n}")
            row: Dict[str, Any] = {"per_class": n}
            for kind, extra in (("finetuned", tuned), ("scratch", [])):
                model_dir, summary = _train(spark, data, f"{kind}-{n}", [*common, *extra])
                row[kind] = round(_test_accuracy(model_dir, test_x, test_y), 4)
                row[f"{kind}_wall_s"] = summary["wall_s"]
            results.append(row)
            print(f"{n:4d} per class: test accuracy fine-tuned {row['finetuned']:.4f}, from scratch "
                  f"{row['scratch']:.4f}", flush=True)
    finally:
        spark.stop()
    first = results[0]
    out: Dict[str, Any] = {
        "ratio": round(first["finetuned"] / max(first["scratch"], 1e-9), 3),
        **{f"finetuned_{r['per_class']}": r["finetuned"] for r in results},
        **{f"scratch_{r['per_class']}": r["scratch"] for r in results},
        "pretrain_val_accuracy": round(pre["metrics"].get("val_accuracy", float("nan")), 4),
        "epochs": EPOCHS, "freeze_epochs": FREEZE_EPOCHS, "backbone_lr_multiplier": BACKBONE_LR_MULTIPLIER,
        "pretrain_epochs": PRETRAIN_EPOCHS, "test_images": int(len(test_y)), "wall_s": round(time.time() - t_start, 1),
        "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if QUICK:
        out["quick"] = True
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

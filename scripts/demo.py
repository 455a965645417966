#!/usr/bin/env python
"""`make demo`: the whole pipeline on real Fashion-MNIST, through `pixelmill run` in this process.

1. obtain Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and export it
   as PNG class folders ``<work>/raw/{train,test}/<class>/`` (skipped when complete);
2. :func:`pipeline.chain.run` on one local SparkSession: ingest -> ``<work>/ingest``
   (val carved from train), Horovod training with 2 processes -> ``<work>/model``,
   scoring of the official test split -> ``<work>/scores``, the report
   ``<work>/report/index.html``. A rerun reuses or resumes each stage's output;
3. a summary table.

The last line printed is one JSON object with ``test_accuracy``,
``wall_seconds`` and per-stage figures, and the report's path.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping

REPO = Path(__file__).resolve().parents[1]
CONFS = [str(REPO / "conf" / "local.yaml"), str(REPO / "conf" / "fashion_mnist.yaml")]
NUM_PROC = 2
PROG = "make demo"


def quick_look_batch_size(train_rows: int, num_proc: int, configured: int, min_steps: int = 4) -> int | None:
    """A smaller per-process batch when a --limit subset is too small for the configured batch, else None.

    The full demo uses conf/fashion_mnist.yaml's batch (256 per process); a 300-image quick look would not fill
    one global batch, which the train job rightly refuses. The largest power of two below the configured batch
    giving at least `min_steps` steps per epoch is used instead.
    """
    if train_rows >= configured * num_proc * min_steps:
        return None
    batch = configured
    while batch > 1 and batch * num_proc * min_steps > train_rows:
        batch //= 2
    return batch


def quick_look(manifest: Mapping[str, Any], cfg: Any) -> Dict[str, Any]:
    """The chain's ``train_overrides``: the quick-look batch once the train split's size is known."""
    train_rows = manifest["splits"].get("train", 0)
    batch = quick_look_batch_size(train_rows, num_proc=cfg.train.num_proc, configured=cfg.train.batch_size)
    if batch is None:
        return {}
    print(f"=== train: {train_rows} train rows is a quick look: "
          f"train.batch_size={batch} per process so every epoch has several steps", flush=True)
    return {"batch_size": batch}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.environ.get("PIXELMILL_WORK", str(REPO / "work" / "demo")))
    p.add_argument("--limit", type=int, default=None, help="first N images per official split (quick look)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from pipeline import chain, sample_data
    from pipeline.cli import report_error, setup_logging
    from pipeline.config import load_config
    from pipeline.spark import build_session

    setup_logging()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"pixelmill demo: work directory {work}", flush=True)
    try:
        t = time.time()
        counts = sample_data.export_class_folders(work / "raw", limit=args.limit)
        export = {"seconds": round(time.time() - t, 1), "images": sum(counts.values())}
        print(f"=== data: Fashion-MNIST {counts} as PNG in {work / 'raw'} ({export['seconds']} s)", flush=True)

        cfg = load_config(CONFS)
        spark = build_session(cfg.spark, app_suffix="demo")
        try:
            summary = chain.run(spark, cfg, input_uri=str(work / "raw"), output_root=str(work), split="test",
                                fresh=args.fresh, num_proc=NUM_PROC, epochs=args.epochs,
                                earlier_stages={"export": export}, train_overrides=quick_look)
        finally:
            spark.stop()
        stages = summary["stages"]
        if stages["ingest"]["action"] == chain.REUSED:
            print("=== ingest: already complete, skipped", flush=True)
        print()
        print(chain.summary_table(chain.Layout.under(str(work)), stages))
    except BaseException as e:  # noqa: BLE001 - one line and an exit code, as the CLI does
        return report_error(PROG, e)
    result = {"test_accuracy": round(float(summary["accuracy"]), 4), "wall_seconds": summary["wall_seconds"],
              "stages": stages, "report": summary["report"], "train_rows": summary["train_rows"]}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training benchmark: Horovod scaling efficiency (2 processes vs 1) and launch overhead.

Run with no arguments: ``python bench/train.py``. It prepares its own data in
``bench/.cache/train/`` (real Fashion-MNIST images from the Debian package
``dataset-fashion-mnist``, exported as class-folder PNGs and ingested by
``pipeline.ingest`` at 28x28 grayscale), then trains with the model and global batch
that ``make demo`` trains with on this machine (``conf/fashion_mnist.yaml``: compact_cnn,
one conv per block, 512 images per step) through ``pipeline.train.run`` on ``local[2]``:

* ``num_proc=1``: per-process batch = the global batch, 1 intra-op thread;
* ``num_proc=2``: per-process batch = half the global batch, 1 intra-op thread each.

Images/s are steady state (the first epoch, with graph tracing and reader
start-up, is excluded by the training worker). Scaling efficiency =
``images/s(2) / (2 x images/s(1))``. Launch overhead = seconds from the
``horovod.spark.run`` call to the end of the first training step on rank 0.
The last line is one JSON object; ``ratio`` is the efficiency.

Large-model case, ``python bench/train.py --large`` (or ``BENCH_CASE=large``; not part of the
no-argument run): ``resnet50`` on the first 4,000 Fashion-MNIST train images (~3,500 train
rows after the split) ingested at 32x32 (the backbone's minimum; grey repeated to RGB inside
the model), 2 epochs (the first not counted), global batch ``LARGE_GLOBAL_BATCH`` (256: 128 per
process at ``num_proc=2``); images/s for ``num_proc=1`` and for ``num_proc=2`` with
``train.compression`` none and fp16, the efficiency of each (``ratio`` = the better one), and
the seconds one eager ``hvd.grouped_allreduce`` of resnet50's trainable variables (~23.5M
parameters) takes on 2 processes with each compression (median of ``ALLREDUCE_REPEATS``).
``BENCH_QUICK=1`` shrinks it to prove the script (its line says ``"quick": true``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache" / "train-20k"
LIMIT = 20_000        # Fashion-MNIST images per split exported: ~18,000 train rows, 35 steps per epoch
GLOBAL_BATCH = 512    # conf/fashion_mnist.yaml: 256 per process x 2 processes
EPOCHS = 4            # the first (tracing, reader start-up) is not counted
ROUNDS = int(os.environ.get("BENCH_REPEATS", "2"))  # np=1 then np=2, repeated; medians reported
#: Extra ``--set`` overrides for A/B runs, e.g. BENCH_SET="loader.cache_max_mb=0".
EXTRA_SET = tuple(os.environ.get("BENCH_SET", "").split())


def _config(num_proc: int, extra: tuple = ()) -> Any:
    from pipeline.config import load_config

    return load_config(["local.yaml", "fashion_mnist.yaml"], [
        "spark.ui_enabled=false", "spark.log_level=ERROR",
        "ingest.height=28", "ingest.width=28", "ingest.color_mode=L", "ingest.max_train_procs=2",
        f"train.num_proc={num_proc}", f"train.batch_size={GLOBAL_BATCH // num_proc}", f"train.epochs={EPOCHS}", "train.lr_schedule=constant", "train.warmup_epochs=0",
        "train.intra_op_threads=1", "train.inter_op_threads=1", "train.early_stopping.patience=100",
        "loader.workers_count=1", *EXTRA_SET, *extra,
    ])


def _prepare(spark: Any) -> str:
    from pipeline import ingest
    from pipeline.commit import is_committed
    from pipeline.fs import filesystem
    from pipeline.sample_data import export_class_folders

    raw = CACHE / "raw"
    out = CACHE / "ingested"
    export_class_folders(raw, limit=LIMIT)
    if not is_committed(filesystem(out.as_uri()), out.as_uri()):
        ingest.run(spark, _config(2), input_uri=raw.as_uri(), output_uri=out.as_uri(), mode="overwrite")
    return "file://" + str(out)


LARGE_CACHE = REPO / "bench" / ".cache" / "train-large"
LARGE_QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
LARGE_LIMIT = 200 if LARGE_QUICK else int(os.environ.get("BENCH_LARGE_LIMIT", "4000"))
#: Images per update over both processes (half per process at num_proc=2). Every update pays
#: per-rank costs that do not shrink with more ranks (the allreduce of ~94 MB of float32
#: gradients, Adam's pass over 23.5M parameters, ~0.1 s and ~0.05-0.07 s on one core here),
#: so the efficiency rises with the per-rank batch; BENCH_LARGE_BATCH=32 or 128 shows the curve.
LARGE_GLOBAL_BATCH = int(os.environ.get("BENCH_LARGE_BATCH", "32" if LARGE_QUICK else "256"))
LARGE_EPOCHS = 2
ALLREDUCE_REPEATS = 2 if LARGE_QUICK else 5


def _large_config(num_proc: int, compression: str = "none") -> Any:
    from pipeline.config import load_config

    return load_config(["local.yaml", "fashion_mnist.yaml"], [
        "spark.ui_enabled=false", "spark.log_level=ERROR",
        "ingest.height=32", "ingest.width=32", "ingest.color_mode=L", "ingest.max_train_procs=2",
        "train.model=resnet50", f"train.num_proc={num_proc}", f"train.batch_size={LARGE_GLOBAL_BATCH // num_proc}",
        f"train.epochs={LARGE_EPOCHS}", "train.lr_schedule=constant", "train.warmup_epochs=0",
        f"train.compression={compression}", "train.intra_op_threads=1", "train.inter_op_threads=1",
        "train.early_stopping.patience=100", "loader.workers_count=1", *EXTRA_SET,
    ])


def _allreduce_seconds(spark: Any, compressions: Tuple[str, ...]) -> Dict[str, Any]:
    """Median seconds of one eager grouped allreduce of resnet50's trainable variables on 2 processes."""
    import horovod.spark

    from pipeline.train import horovod_env

    repeats = ALLREDUCE_REPEATS

    def time_allreduce() -> Dict[str, Any]:
        import statistics as st
        import time as t

        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        import horovod.tensorflow as hvd

        from pipeline.train.models import build_model

        hvd.init()
        model = build_model("resnet50", (32, 32, 1), 10)
        grads = [tf.random.normal(v.shape, seed=i) for i, v in enumerate(model.trainable_variables)]
        out: Dict[str, Any] = {"params": int(sum(int(tf.size(g)) for g in grads))}
        for name in compressions:
            comp = hvd.Compression.fp16 if name == "fp16" else hvd.Compression.none
            times = []
            for _ in range(repeats + 1):  # the first negotiates and allocates: not counted
                t0 = t.perf_counter()
                res = hvd.grouped_allreduce(grads, op=hvd.Average, compression=comp)
                float(res[-1][0, ...].numpy().ravel()[0])
                times.append(t.perf_counter() - t0)
            out[name] = st.median(times[1:])
        return out

    env = horovod_env(_large_config(2))
    res = horovod.spark.run(time_allreduce, num_proc=2, use_gloo=True, nics=["lo"], start_timeout=120, env=env)
    return res[0]


def main_large() -> int:
    from pipeline import ingest, train
    from pipeline.commit import is_committed
    from pipeline.contracts import read_manifest
    from pipeline.fs import filesystem
    from pipeline.sample_data import export_class_folders
    from pipeline.spark import build_session

    spark = build_session(_large_config(2).spark, app_suffix="bench-train-large")
    try:
        raw, out = LARGE_CACHE / f"raw-{LARGE_LIMIT}", LARGE_CACHE / f"ingested-{LARGE_LIMIT}"
        export_class_folders(raw, limit=LARGE_LIMIT, splits=("train",))
        if not is_committed(filesystem(out.as_uri()), out.as_uri()):
            ingest.run(spark, _large_config(2), input_uri=raw.as_uri(), output_uri=out.as_uri(), mode="overwrite")
        data = out.as_uri()
        runs: Dict[str, Dict[str, Any]] = {}
        for key, n, comp in (("np1", 1, "none"), ("np2_none", 2, "none"), ("np2_fp16", 2, "fp16")):
            model_dir = LARGE_CACHE / f"model-{key}"
            shutil.rmtree(model_dir, ignore_errors=True)
            t0 = time.time()
            runs[key] = train.run(spark, _large_config(n, comp), data_uri=data, model_dir=model_dir.as_uri(),
                                  mode="overwrite")
            runs[key]["wall_s"] = round(time.time() - t0, 1)
            print(f"{key}: {runs[key]['images_per_second']:.1f} img/s, {runs[key]['wall_s']} s", flush=True)
        seconds = _allreduce_seconds(spark, ("none", "fp16"))
    finally:
        spark.stop()
    ips1 = runs["np1"]["images_per_second"]
    eff = {c: runs[f"np2_{c}"]["images_per_second"] / (2 * ips1) for c in ("none", "fp16")}
    print(f"resnet50 32x32, global batch {LARGE_GLOBAL_BATCH}: efficiency none {eff['none']:.3f}, fp16 "
          f"{eff['fp16']:.3f}; allreduce of {seconds['params']:,} params: none {seconds['none']:.3f} s, "
          f"fp16 {seconds['fp16']:.3f} s")
    line = {
        "ratio": round(max(eff.values()), 3), "efficiency_none": round(eff["none"], 3),
        "efficiency_fp16": round(eff["fp16"], 3), "images_per_second_np1": round(ips1, 1),
        "images_per_second_np2_none": round(runs["np2_none"]["images_per_second"], 1),
        "images_per_second_np2_fp16": round(runs["np2_fp16"]["images_per_second"], 1),
        "allreduce_s_none": round(seconds["none"], 4), "allreduce_s_fp16": round(seconds["fp16"], 4),
        "allreduce_params": seconds["params"], "global_batch": LARGE_GLOBAL_BATCH, "epochs": LARGE_EPOCHS,
        "train_rows": read_manifest(data).splits.get("train"),
        "wall_s": round(sum(r["wall_s"] for r in runs.values()), 1),
        "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if LARGE_QUICK:
        line["quick"] = True
    print(json.dumps(line))
    return 0


def main() -> int:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if "--large" in sys.argv[1:] or os.environ.get("BENCH_CASE") == "large":
        return main_large()
    from pipeline import train
    from pipeline.contracts import read_manifest
    from pipeline.spark import build_session

    spark = build_session(_config(2).spark, app_suffix="bench-train")
    try:
        data = _prepare(spark)
        manifest = read_manifest(data)
        rounds: List[Dict[int, Dict[str, Any]]] = []
        for r in range(ROUNDS):  # alternating, so both process counts see the same machine
            runs: Dict[int, Dict[str, Any]] = {}
            for n in (1, 2):
                model_dir = CACHE / f"model-np{n}"
                shutil.rmtree(model_dir, ignore_errors=True)
                t0 = time.time()
                runs[n] = train.run(spark, _config(n), data_uri=data, model_dir=model_dir.as_uri(), mode="overwrite")
                runs[n]["wall_s"] = time.time() - t0
            rounds.append(runs)
            eff_r = runs[2]["images_per_second"] / (2 * runs[1]["images_per_second"])
            print(f"round {r + 1}: np1 {runs[1]['images_per_second']:.1f} img/s, np2 {runs[2]['images_per_second']:.1f} "
                  f"img/s, efficiency {eff_r:.3f}", flush=True)
    finally:
        spark.stop()
    effs = [rr[2]["images_per_second"] / (2 * rr[1]["images_per_second"]) for rr in rounds]
    eff = statistics.median(effs)
    ips1 = statistics.median(rr[1]["images_per_second"] for rr in rounds)
    ips2 = statistics.median(rr[2]["images_per_second"] for rr in rounds)
    launch1 = statistics.median(rr[1]["timings"]["launch_overhead_s"] for rr in rounds)
    launch2 = statistics.median(rr[2]["timings"]["launch_overhead_s"] for rr in rounds)
    wall1 = statistics.median(rr[1]["wall_s"] for rr in rounds)
    wall2 = statistics.median(rr[2]["wall_s"] for rr in rounds)
    last = rounds[-1]
    print(f"medians of {ROUNDS} rounds")
    print(f"{'':24s}{'num_proc=1':>14s}{'num_proc=2':>14s}")
    print(f"{'images/s (steady)':24s}{ips1:14.1f}{ips2:14.1f}")
    print(f"{'launch overhead s':24s}{launch1:14.1f}{launch2:14.1f}")
    print(f"{'wall s':24s}{wall1:14.1f}{wall2:14.1f}")
    print(f"{'val_accuracy (last)':24s}{last[1]['metrics'].get('val_accuracy', float('nan')):14.4f}"
          f"{last[2]['metrics'].get('val_accuracy', float('nan')):14.4f}")
    print(f"scaling efficiency (2 vs 1 process, global batch {GLOBAL_BATCH}): {eff:.3f} (target >= 0.8); "
          f"rounds {[round(e, 3) for e in effs]}")
    print(json.dumps({
        "ratio": round(eff, 3), "round_ratios": [round(e, 3) for e in effs], "rounds": ROUNDS,
        "images_per_second_np1": round(ips1, 1), "images_per_second_np2": round(ips2, 1),
        "launch_overhead_s": round(launch2, 3), "launch_overhead_s_np1": round(launch1, 3),
        "global_batch": GLOBAL_BATCH, "epochs": EPOCHS, "train_rows": manifest.splits.get("train"),
        "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

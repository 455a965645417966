#!/usr/bin/env python
"""`make demo`: the whole pipeline on real Fashion-MNIST with the real spark-submit jobs.

Steps (each skipped when its output is already complete, so a rerun resumes):

1. obtain Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and export it
   as PNG class folders ``<work>/raw/{train,test}/<class>/``;
2. ``spark-submit jobs/ingest.py`` -> ``<work>/ingest`` (val carved from train);
3. ``spark-submit jobs/train.py`` with Horovod, 2 processes -> ``<work>/model``;
4. ``spark-submit jobs/score.py`` on the official test split -> ``<work>/scores``;
5. a report ``<work>/report/index.html`` and a summary table.

The last line printed is one JSON object with ``test_accuracy``,
``wall_seconds`` and per-stage figures, and the report's path.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]


def _env() -> Dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYSPARK_DRIVER_PYTHON"] = sys.executable
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_job(stage: str, args: List[str], *, confs: List[str], log_dir: Path) -> Dict[str, Any]:
    """Run ``spark-submit jobs/<stage>.py``; stream its progress; return its JSON summary."""
    cmd = ["spark-submit", "--master", "local[2]", "--driver-memory", "4g",
           "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
           str(REPO / "jobs" / f"{stage}.py"), *args]
    for c in confs:
        cmd += ["--config", c]
    print(f"\n=== {stage}: {' '.join(cmd[5:])}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    last_json: Dict[str, Any] = {}
    with open(log_dir / f"{stage}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env(), cwd=REPO, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            s = line.strip()
            if s.startswith("{") and s.endswith("}"):
                try:
                    last_json = json.loads(s)
                    continue
                except json.JSONDecodeError:
                    pass
            if _interesting(s):
                print(f"  [{stage}] {s}", flush=True)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"demo: {stage} failed with exit code {rc}; see {log_dir / (stage + '.log')}")
    return last_json


def _interesting(line: str) -> bool:
    """Progress lines worth showing; Spark/JVM chatter stays in the log file."""
    if not line:
        return False
    noise = ("WARN ", "INFO ShutdownHookManager", "WARNING: Using incubator", "Using Spark's default log4j",
             "Setting default log level", "To adjust logging level", "NativeCodeLoader", "[Stage ",
             "oneDNN", "cpu_feature_guard", "This TensorFlow binary", "To enable the following", "WARNING: All log",
             "E0000", "W0000", "I0000", "Py4J", "py4j", "ConnectionResetError", "Traceback", "  File ")
    if any(n in line for n in noise):
        return False
    return any(k in line for k in (" INFO pipeline", "epoch", "Epoch", "error", "Error", "rank 0", "ingest", "scor", "%"))


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


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.environ.get("PIXELMILL_WORK", str(REPO / "work" / "demo")))
    p.add_argument("--limit", type=int, default=None, help="first N images per official split (quick look)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    args = p.parse_args(argv)

    from pipeline import report, sample_data

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stages: Dict[str, Dict[str, Any]] = {}
    confs = [str(REPO / "conf" / "local.yaml"), str(REPO / "conf" / "fashion_mnist.yaml")]

    print(f"pixelmill demo: work directory {work}", flush=True)
    t = time.time()
    counts = sample_data.export_class_folders(work / "raw", limit=args.limit)
    stages["export"] = {"seconds": round(time.time() - t, 1), "images": sum(counts.values())}
    print(f"=== data: Fashion-MNIST {counts} as PNG in {work / 'raw'} ({stages['export']['seconds']} s)", flush=True)

    mode = ["--mode", "overwrite"] if args.fresh else []
    ingest_out, model_dir, score_out = work / "ingest", work / "model", work / "scores"
    logs = work / "logs"

    t = time.time()
    if args.fresh or not (ingest_out / "_PIXELMILL_COMMITTED").exists():
        summary = run_job("ingest", ["--input", str(work / "raw"), "--output", str(ingest_out), "--mode", "overwrite"],
                          confs=confs, log_dir=logs)
    else:
        print("=== ingest: already complete, skipped", flush=True)
        summary = {}
    manifest = json.loads((ingest_out / "_manifest.json").read_text())
    stages["ingest"] = {"seconds": round(time.time() - t, 1), "images": manifest["files_seen"],
                        "accepted": manifest["accepted"], "rejected": sum(manifest["rejected"].values()),
                        "images_per_second": manifest.get("images_per_second") or summary.get("images_per_second")}

    t = time.time()
    train_args = ["--data", str(ingest_out), "--model-dir", str(model_dir), "--num-proc", "2"]
    if args.epochs:
        train_args += ["--epochs", str(args.epochs)]
    from pipeline.config import load_config

    configured = load_config(confs).train.batch_size
    batch = quick_look_batch_size(manifest["splits"].get("train", 0), num_proc=2, configured=configured)
    if batch is not None:
        print(f"=== train: {manifest['splits'].get('train', 0)} train rows is a quick look: "
              f"train.batch_size={batch} per process so every epoch has several steps", flush=True)
        train_args += ["--set", f"train.batch_size={batch}"]
    summary = run_job("train", train_args + (mode or ["--mode", "resume"]), confs=confs, log_dir=logs)
    model_meta = json.loads((model_dir / "model.json").read_text())
    train_rows = manifest["splits"].get("train", 0)
    epochs_run = int(summary.get("epochs_run", model_meta.get("epochs_completed", 0)))
    secs = time.time() - t
    stages["train"] = {"seconds": round(secs, 1), "epochs": model_meta.get("epochs_completed"),
                       "epochs_run_now": epochs_run,
                       "images_per_second": summary.get("images_per_second"),
                       "val_accuracy": model_meta.get("metrics", {}).get("val_accuracy")}

    t = time.time()
    summary = run_job("score", ["--data", str(ingest_out), "--model", str(model_dir), "--output", str(score_out),
                                "--split", "test", "--mode", "overwrite"], confs=confs, log_dir=logs)
    metrics = json.loads((score_out / "_metrics.json").read_text())
    secs = time.time() - t
    stages["score"] = {"seconds": round(secs, 1), "images": metrics.get("rows") or summary.get("rows"),
                       "images_per_second": summary.get("images_per_second"), "accuracy": metrics["accuracy"]}

    wall = round(time.time() - t0, 1)
    report_path = report.write_report(work / "report", ingest_dir=ingest_out, model_dir=model_dir,
                                      score_dir=score_out, stages=stages, wall_seconds=wall)
    print()
    print(report.summary_table(manifest, model_meta, metrics, stages))
    result = {"test_accuracy": round(float(metrics["accuracy"]), 4), "wall_seconds": wall, "stages": stages,
              "report": str(report_path), "train_rows": train_rows}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

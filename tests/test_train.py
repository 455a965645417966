"""Horovod-on-Spark training: real local[2] Spark, real Parquet, real Horovod over Gloo.

The expensive part (Horovod launches, ~15 s each) is shared: one model-dir is
trained for 1 epoch, then resumed to 5 epochs, and most assertions read that
model-dir. A second model-dir has rank 1 SIGKILLed mid-epoch and is resumed.
"""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from outputs import version_dir
from pipeline import faults
from pipeline.errors import ConfigError, DataError, TrainingError
from pipeline.train.checkpoints import checkpoints_to_delete, latest_complete
from pipeline.train.schedule import EarlyStopping, learning_rate_at

# --- pure logic ----------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_to_size_times_base():
    lrs = [learning_rate_at(s, base_lr=0.01, size=4, warmup_steps=4) for s in range(6)]
    assert lrs == pytest.approx([0.01, 0.0175, 0.025, 0.0325, 0.04, 0.04])
    assert learning_rate_at(0, base_lr=0.01, size=4, warmup_steps=0) == pytest.approx(0.04)
    assert learning_rate_at(3, base_lr=0.01, size=1, warmup_steps=10) == pytest.approx(0.01)


def test_cosine_schedule_decays_from_the_peak_to_the_floor_after_warm_up():
    kw = dict(base_lr=0.01, size=2, warmup_steps=2, schedule="cosine", total_steps=10, min_ratio=0.1)
    lrs = [learning_rate_at(s, **kw) for s in (0, 1, 2, 6, 10, 12)]
    # warm-up 0.01 -> 0.02, then 0.02 -> 0.002 along a half cosine (midpoint 0.011), held at the floor.
    assert lrs == pytest.approx([0.01, 0.015, 0.02, 0.011, 0.002, 0.002])
    assert learning_rate_at(6, **{**kw, "schedule": "constant"}) == pytest.approx(0.02)


def _hand_rolled_learning_rate(step, *, base_lr, size, warmup_steps, schedule="constant", total_steps=0,
                               min_ratio=0.0):
    """The schedule the trainer computed by hand before it used Keras' CosineDecay."""
    import math

    target = base_lr * size
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr + (target - base_lr) * (step / warmup_steps)
    if schedule == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        floor = target * min_ratio
        return floor + (target - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return target


@pytest.mark.parametrize("base_lr, size, steps, epochs, warmup_epochs, schedule, min_ratio", [
    (0.0015, 2, 35, 6, 0.5, "cosine", 0.0),    # conf/fashion_mnist.yaml's schedule
    (1e-3, 2, 3, 5, 1.0, "constant", 0.0),     # the tests' sample config
    (0.01, 4, 17, 9, 1.5, "cosine", 0.1),
    (0.01, 1, 10, 2, 0.0, "cosine", 0.0),      # no warm-up
    (0.01, 2, 4, 1, 2.0, "cosine", 0.0),       # warm-up longer than the run: nothing left to decay
])
def test_keras_schedule_gives_the_hand_rolled_rates_over_a_whole_run(base_lr, size, steps, epochs, warmup_epochs,
                                                                      schedule, min_ratio):
    import numpy as np

    from pipeline.train.schedule import learning_rate_schedule

    kw = dict(base_lr=base_lr, size=size, warmup_steps=int(round(warmup_epochs * steps)), schedule=schedule,
              total_steps=steps * epochs, min_ratio=min_ratio)
    rate = learning_rate_schedule(**kw)
    run = range(steps * epochs + 2)  # every step of the run, and past its end
    keras_rates = np.array([float(rate(s)) for s in run])
    hand_rates = np.array([_hand_rolled_learning_rate(s, **kw) for s in run])
    np.testing.assert_allclose(keras_rates, hand_rates, rtol=1e-12, atol=0)
    # What the optimizer applies is the float32 rounding: identical, step by step.
    assert (keras_rates.astype(np.float32) == hand_rates.astype(np.float32)).all()


def test_early_stopping_state_survives_a_resume():
    values = [0.50, 0.60, 0.58, 0.59, 0.61, 0.60, 0.60, 0.60]
    straight = EarlyStopping("val_accuracy", patience=2)
    stops = [straight.update(i + 1, v) for i, v in enumerate(values)]
    assert stops == [False, False, False, False, False, False, False, True]
    assert (straight.best, straight.best_epoch) == (0.61, 5)

    # Interrupted after epoch 6, restored from the checkpointed dict: same decisions.
    first = EarlyStopping("val_accuracy", patience=2)
    for i, v in enumerate(values[:6]):
        first.update(i + 1, v)
    resumed = EarlyStopping.from_dict(json.loads(json.dumps(first.to_dict())))
    assert [resumed.update(i + 7, v) for i, v in enumerate(values[6:])] == [False, True]
    assert resumed.to_dict() == straight.to_dict()


def test_early_stopping_on_loss_minimises():
    es = EarlyStopping("val_loss", patience=0, min_delta=0.01)
    assert es.update(1, 1.0) is False
    assert es.update(2, 0.995) is True  # not better by min_delta
    assert es.best_epoch == 1


def test_only_complete_checkpoints_count():
    names = ["epoch-0001", "epoch-0002", "epoch-0003", ".tmp-epoch-0004-ab12", "junk"]
    assert latest_complete(names, ["epoch-0001", "epoch-0002"]) == (2, "epoch-0002")
    assert latest_complete(names, []) is None
    assert latest_complete(["epoch-0009", "epoch-0010"], ["epoch-0009", "epoch-0010"]) == (10, "epoch-0010")


def test_checkpoint_pruning_keeps_newest_and_best():
    names = [f"epoch-{i:04d}" for i in range(1, 7)] + [".tmp-epoch-0007-ff00"]
    assert checkpoints_to_delete(names, keep_last=2, keep_epochs=[2]) == [
        ".tmp-epoch-0007-ff00", "epoch-0001", "epoch-0003", "epoch-0004"]


def test_fault_spec_parsing(monkeypatch):
    # PIXELMILL_TRAIN_FAULT='kill:rank=1:epoch=2:step=3' became the one mechanism's train.step point.
    assert faults.parse("train.step:kill:rank=1:epoch=2:step=3") == faults.FaultPlan(
        "train.step", "kill", when={"rank": 1, "epoch": 2, "step": 3})
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.armed() is None
    with pytest.raises(ConfigError, match="an action of raise, kill, exit, hang, drop_row"):
        faults.parse("train.step:explode:rank=1")


# --- validation before launch (real Spark, no Horovod) ----------------------------------


def test_horovod_cycle_time_comes_from_config_with_a_cpu_and_a_gpu_default():
    from pipeline.config import load_config
    from pipeline.train import horovod_env

    assert horovod_env(load_config(["local.yaml"]))["HOROVOD_CYCLE_TIME"] == "10"
    assert horovod_env(load_config(["cluster.yaml", "gpu.yaml"]))["HOROVOD_CYCLE_TIME"] == "1"
    assert horovod_env(load_config(overrides=["train.cycle_time_ms=2.5"]))["HOROVOD_CYCLE_TIME"] == "2.5"
    with pytest.raises(ConfigError, match="train.cycle_time_ms"):
        load_config(overrides=["train.cycle_time_ms=-1"])


def test_num_proc_beyond_task_slots_fails_before_launch(spark, sample_config, ingested_sample, tmp_path):
    from pipeline import train

    cfg = sample_config.model_copy(update={"train": sample_config.train.model_copy(update={"num_proc": 3})})
    model_dir = "file://" + str(tmp_path / "m")
    with pytest.raises(ConfigError) as exc:
        train.run(spark, cfg, data_uri=ingested_sample, model_dir=model_dir, mode="resume")
    msg = str(exc.value)
    assert "train.num_proc=3" in msg and "offers 2" in msg and "\n" not in msg
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("master, counts, want, polls", [
    ("spark://127.0.0.1:7077", [1, 1, 2], 2, 3),  # executors registering: waits until there are enough
    ("spark://127.0.0.1:7077", [1] * 1000, 1, None),  # never enough: gives up at the timeout
    ("local[1]", [1, 2], 1, 1),  # local masters have every slot at once: no wait
])
def test_wait_for_task_slots_waits_for_executors_only_on_a_cluster(monkeypatch, master, counts, want, polls):
    import types

    from pipeline import spark as spark_mod

    seen = iter(counts)
    calls = []

    def fake_slots(_spark):
        calls.append(1)
        return next(seen)

    monkeypatch.setattr(spark_mod, "task_slots", fake_slots)
    fake = types.SimpleNamespace(sparkContext=types.SimpleNamespace(master=master))
    t0 = time.monotonic()
    assert spark_mod.wait_for_task_slots(fake, 2, timeout_s=0.3, poll_s=0.01) == want
    if polls is not None:
        assert len(calls) == polls
    else:
        assert 0.3 <= time.monotonic() - t0 < 5


def test_data_that_is_not_an_ingest_output_is_refused(spark, sample_config, tmp_path):
    from pipeline import train

    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match="not a committed ingest output"):
        train.run(spark, sample_config, data_uri="file://" + str(tmp_path / "raw"),
                  model_dir="file://" + str(tmp_path / "m"), mode="resume")
    assert not (tmp_path / "m").exists()


def test_bad_mode_is_refused(spark, sample_config, ingested_sample, tmp_path):
    from pipeline import train

    with pytest.raises(ConfigError, match="--mode must be one of resume, overwrite"):
        train.run(spark, sample_config, data_uri=ingested_sample, model_dir="file://" + str(tmp_path / "m"),
                  mode="append")


# --- real distributed training -----------------------------------------------------------


def _cfg(sample_config, **train):
    return sample_config.model_copy(update={"train": sample_config.train.model_copy(update=train)})


@pytest.fixture(scope="module")
def trained(spark, sample_config, ingested_sample, tmp_path_factory):
    """1 epoch, then a rerun with epochs=5 resumes it: the shared model-dir."""
    from pipeline import train

    model_dir = "file://" + str(tmp_path_factory.mktemp("train") / "model")
    first = train.run(spark, _cfg(sample_config, epochs=1), data_uri=ingested_sample, model_dir=model_dir,
                      mode="resume")
    second = train.run(spark, _cfg(sample_config, epochs=5), data_uri=ingested_sample, model_dir=model_dir,
                       mode="resume")
    return {"dir": Path(model_dir[len("file://"):]), "uri": model_dir, "first": first, "second": second}


@pytest.mark.slow
def test_both_ranks_finish_with_identical_weights(trained):
    for run in (trained["first"], trained["second"]):
        assert run["num_proc"] == 2
        assert len(run["weights_sha256"]) == 2
        assert run["weights_sha256"][0] == run["weights_sha256"][1]
    # ... and the resumed run moved them on.
    assert trained["first"]["weights_sha256"][0] != trained["second"]["weights_sha256"][0]


@pytest.mark.slow
def test_rerun_resumes_from_checkpoint_and_continues_epoch_numbering(trained):
    first, second = trained["first"], trained["second"]
    assert (first["epochs_completed"], first["epochs_run"], first["resumed_from"]) == (1, 1, None)
    assert (second["epochs_completed"], second["epochs_run"], second["resumed_from"]) == (5, 4, "epoch-0001")
    rows = list(csv.DictReader((trained["dir"] / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    # The epoch-1 row is the first run's, carried through the checkpoint unchanged.
    assert float(rows[0]["train_loss"]) == pytest.approx(
        json.loads((trained["dir"] / "checkpoints" / "epoch-0005" / "state.json").read_text())["history"][0]["train_loss"])


@pytest.mark.slow
def test_loss_goes_down_and_the_model_learns(trained):
    rows = list(csv.DictReader((trained["dir"] / "history.csv").open()))
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    assert float(rows[-1]["train_accuracy"]) > 0.8
    assert max(float(r["val_accuracy"]) for r in rows) > 0.6  # 3 classes: chance is 0.33
    # Warm-up: learning rate reaches base_lr x num_proc.
    assert float(rows[-1]["learning_rate"]) == pytest.approx(2 * 1e-3)


@pytest.mark.slow
def test_model_dir_layout_follows_the_contract(trained, ingested_sample):
    d = trained["dir"]
    ckpts = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert ckpts[-2:] == ["epoch-0004", "epoch-0005"] and not any(n.startswith(".tmp") for n in ckpts)
    for name in ckpts:
        assert (d / "checkpoints" / name / "_COMPLETE").exists()
        assert {p.name for p in (d / "checkpoints" / name).iterdir()} == {
            "_COMPLETE", "model.weights.h5", "optimizer.npz", "state.json"}
    assert (d / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((d / "tensorboard").glob("events.out.tfevents.*"))
    with (d / "history.csv").open() as f:
        assert next(csv.reader(f)) == ["epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                       "learning_rate", "images_per_second", "epoch_seconds"]

    info = json.loads((d / "model.json").read_text())
    manifest_path = version_dir(ingested_sample) / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    blob = (d / "model" / "model.keras").read_bytes()
    assert info["model_id"] == hashlib.sha256(blob).hexdigest()[:16] == trained["second"]["model_id"]
    assert info["classes"] == manifest["classes"]
    assert info["image"] == manifest["image"]
    assert info["ingest_manifest_sha256"] == hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    assert info["normalization"] == {"mean": manifest["stats"]["mean"], "std": manifest["stats"]["std"]}
    assert info["epochs_completed"] == 5
    assert set(info["metrics"]) == {"val_accuracy", "val_loss", "train_loss", "train_accuracy"}
    assert info["metrics"] == trained["second"]["metrics"]
    assert {"tensorflow", "keras", "horovod"} <= set(info["stack"])
    assert info["config"]["train"]["epochs"] == 5 and "normalize" in info["config"]["loader"]


@pytest.mark.slow
def test_rerun_of_a_finished_run_is_a_no_op(spark, sample_config, ingested_sample, trained):
    from pipeline import train

    before = {p: p.stat().st_mtime_ns for p in trained["dir"].rglob("*") if p.is_file()}
    again = train.run(spark, _cfg(sample_config, epochs=5), data_uri=ingested_sample, model_dir=trained["uri"],
                      mode="resume")
    assert again["skipped"] is True and again["epochs_run"] == 0
    assert again["model_id"] == trained["second"]["model_id"]
    assert {p: p.stat().st_mtime_ns for p in trained["dir"].rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_resume_into_a_model_dir_of_another_model_is_refused(spark, sample_config, ingested_sample, trained):
    from pipeline import train

    with pytest.raises(ConfigError, match="--mode overwrite"):
        train.run(spark, _cfg(sample_config, epochs=4, model="resnet"), data_uri=ingested_sample,
                  model_dir=trained["uri"], mode="resume")


_PREDICT = r"""
import json, sys
import numpy as np
import keras
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
x = np.load(sys.argv[2])
p = model.predict(x, verbose=0)
print(json.dumps({"shape": list(p.shape), "sums": p.sum(axis=1).tolist(), "pred": p.argmax(axis=1).tolist(),
                  "modules": sorted(m for m in sys.modules if m.startswith("pipeline"))}))
"""


@pytest.mark.slow
def test_exported_model_loads_in_a_fresh_process_and_predicts(trained, ingested_sample, tmp_path, repo_root):
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.imaging.stored import ImageSpec, Normalization, decode_batch, normalize_np

    info = json.loads((trained["dir"] / "model.json").read_text())
    table = pq.read_table(version_dir(ingested_sample) / "images" / "split=val")
    spec = ImageSpec.from_manifest(info)
    x = normalize_np(decode_batch(table.column("image").to_pylist(), spec), Normalization.from_dict(info["normalization"]))
    labels = np.asarray(table.column("label_index").to_pylist())
    np.save(tmp_path / "x.npy", x.astype("float32"))
    # A clean process outside the repo: no pixelmill on the import path beyond site-packages, none imported.
    out = subprocess.run([sys.executable, "-c", _PREDICT, str(trained["dir"] / "model" / "model.keras"),
                          str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == [len(labels), len(info["classes"])]
    assert res["sums"] == pytest.approx([1.0] * len(labels), abs=1e-4)
    assert res["modules"] == []
    accuracy = float(np.mean(np.asarray(res["pred"]) == labels))
    assert accuracy == pytest.approx(info["metrics"]["val_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_killed_rank_fails_fast_and_a_rerun_resumes(spark, sample_config, ingested_sample, tmp_path, monkeypatch):
    from pipeline import train
    from pipeline.faults import ENV as FAULT_ENV

    model_dir = "file://" + str(tmp_path / "model")
    cfg = _cfg(sample_config, epochs=2, step_timeout=60)
    monkeypatch.setenv(FAULT_ENV, "train.step:kill:rank=1:epoch=2:step=2")
    t0 = time.monotonic()
    with pytest.raises(TrainingError) as exc:
        train.run(spark, cfg, data_uri=ingested_sample, model_dir=model_dir, mode="resume")
    elapsed = time.monotonic() - t0
    msg = str(exc.value)
    assert "\n" not in msg
    assert "killed by signal 9" in msg and "resume" in msg and model_dir in msg
    # Bounded: far below the step timeout a hang would need (the launch itself takes ~15 s).
    assert elapsed < cfg.train.start_timeout + cfg.train.step_timeout
    ck = tmp_path / "model" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["epoch-0001"]
    assert not (tmp_path / "model" / "model.json").exists()
    # Spark is healthy afterwards: the Horovod job group was cancelled, not left running.
    assert spark.range(10).count() == 10

    monkeypatch.delenv(FAULT_ENV)
    resumed = train.run(spark, cfg, data_uri=ingested_sample, model_dir=model_dir, mode="resume")
    assert (resumed["resumed_from"], resumed["epochs_run"], resumed["epochs_completed"]) == ("epoch-0001", 1, 2)
    assert resumed["weights_sha256"][0] == resumed["weights_sha256"][1]

    # --mode overwrite starts fresh.
    fresh = train.run(spark, _cfg(sample_config, epochs=1), data_uri=ingested_sample, model_dir=model_dir,
                      mode="overwrite")
    assert (fresh["resumed_from"], fresh["epochs_completed"]) == (None, 1)
    assert sorted(p.name for p in ck.iterdir()) == ["epoch-0001"]


@pytest.mark.slow
def test_cli_rejects_too_many_processes_in_one_line(ingested_sample, tmp_path, repo_root):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--data", ingested_sample, "--model-dir", str(tmp_path / "m"),
         "--num-proc", "3", "--config", "local.yaml", "--set", "spark.ui_enabled=false", "--set", "train.batch_size=16"],
        capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pixelmill train: error: train.num_proc=3 needs 3 concurrent Spark task slots")
    assert not (tmp_path / "m").exists()


_SERVE = r"""
import base64, json, sys
import numpy as np
import tensorflow as tf
blobs = [base64.b64decode(b) for b in json.load(open(sys.argv[2]))]
loaded = tf.saved_model.load(sys.argv[1])
by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant(blobs))["probabilities"].numpy()
pixels = tf.cast(tf.stack([tf.io.decode_png(b) for b in blobs]), tf.float32)
by_pixels = loaded.signatures["serving_pixels"](pixels=pixels)["probabilities"].numpy()
print(json.dumps({"bytes": by_bytes.tolist(), "pixels": by_pixels.tolist(), "signatures": sorted(loaded.signatures),
                  "modules": sorted(m for m in sys.modules if m.startswith("pipeline"))}))
"""


@pytest.mark.slow
def test_saved_model_in_a_fresh_process_predicts_what_scoring_predicts(spark, sample_config, trained,
                                                                        ingested_sample, tmp_path):
    import base64

    import numpy as np
    import pyarrow.parquet as pq

    from pipeline import score

    score.run(spark, sample_config, data_uri=ingested_sample, model_uri=trained["uri"],
              output_uri="file://" + str(tmp_path / "scores"), split="val", mode="error")
    preds = pq.read_table(version_dir(tmp_path / "scores") / "predictions").to_pandas().set_index("image_id")
    rows = pq.read_table(version_dir(ingested_sample) / "images" / "split=val",
                         columns=["image_id", "image"]).to_pylist()
    (tmp_path / "images.json").write_text(json.dumps([base64.b64encode(r["image"]).decode() for r in rows]))
    info = json.loads((trained["dir"] / "model.json").read_text())
    assert info["serving"]["saved_model"] == "model/saved_model"
    out = subprocess.run([sys.executable, "-c", _SERVE, str(trained["dir"] / "model" / "saved_model"),
                          str(tmp_path / "images.json")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["modules"] == [] and res["signatures"] == ["serving_default", "serving_pixels"]
    by_bytes = np.asarray(res["bytes"])
    np.testing.assert_allclose(np.asarray(res["pixels"]), by_bytes, atol=1e-6)
    classes = [n for n, _ in sorted(info["classes"].items(), key=lambda kv: kv[1])]
    assert by_bytes.shape == (len(rows), len(classes)) == (len(preds), len(classes))
    for r, p in zip(rows, by_bytes):
        scored = preds.loc[r["image_id"]]
        assert int(np.argmax(p)) == scored["pred_index"]
        # top_k covers all 3 classes: scoring's whole probability vector, reordered by its labels.
        np.testing.assert_allclose(p[[classes.index(c) for c in scored["top_k_labels"]]],
                                   scored["top_k_probabilities"], atol=1e-5)

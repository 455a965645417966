"""The fine-tuning schedule and large-model Horovod settings (fp16 compression, fusion, accumulation).

Fast tests check the pure parts: the phase of an epoch, the fingerprint, the head/backbone
split and its frozen forward pass, the one-line errors, the Horovod environment, the history
and curves. The slow ones train on 2 real Horovod ranks (Gloo): freeze -> unfreeze with resumes
on both sides of the boundary, fp16 compression, and accumulate_steps=2 at batch 8 against
batch 16.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.train.finetune import FROZEN, FULL, UNFROZEN, Schedule, Split, unfreeze_problem
from pipeline.train.models import HEAD_LAYER, build_model

# --- pure ---------------------------------------------------------------------------------


def test_the_phase_is_decided_by_the_epoch_number_alone():
    s = Schedule(freeze_epochs=2, backbone_lr_multiplier=0.1)
    assert [s.phase(e) for e in range(1, 5)] == [FROZEN, FROZEN, UNFROZEN, UNFROZEN]
    assert Schedule(backbone_lr_multiplier=0.1).phase(1) == UNFROZEN  # no frozen epochs, a slower backbone
    assert Schedule().active is False and Schedule().phase(1) == FULL


def test_the_fingerprint_gains_the_schedule_keys_only_when_they_are_set():
    from pipeline.config import load_config
    from pipeline.train.driver import fingerprint

    manifest = {"classes": {"a": 0, "b": 1}, "image": {"height": 8}}
    plain = fingerprint(load_config(), manifest, "sha")
    assert set(plain) == {"ingest_manifest_sha256", "classes", "image", "model", "optimizer", "mixed_precision"}
    tuned = fingerprint(load_config(overrides=["train.freeze_epochs=2", "train.backbone_lr_multiplier=0.1"]),
                        manifest, "sha")
    assert tuned == {**plain, "freeze_epochs": 2, "backbone_lr_multiplier": 0.1}
    assert fingerprint(load_config(overrides=["train.unfreeze_from=fc"]), manifest, "sha")["unfreeze_from"] == "fc"


def test_split_freezes_the_backbone_in_inference_mode_and_unfreezes_from_a_layer():
    model = build_model("compact_cnn", (16, 16, 3), 3, dropout=0.2)
    split = Split(model, Schedule(1, "block2a_conv", 0.1), "compact_cnn")
    assert [v.path for v in split.head_vars] == [f"{HEAD_LAYER}/kernel", f"{HEAD_LAYER}/bias"]
    assert split.variables(FROZEN) == (split.head_vars, [])
    assert split.unfrozen_vars[0].path == "block2a_conv/kernel" and "block1a_conv/kernel" not in {
        v.path for v in split.unfrozen_vars}
    x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype("float32")
    moving = [v for v in model.non_trainable_variables if "moving" in v.path]  # not the dropout seeds
    stats = [v.numpy().copy() for v in moving]
    split.forward(x, FROZEN)  # the backbone in inference mode: its BatchNorm statistics stay
    assert len(moving) == 10 and all(np.array_equal(a, v.numpy()) for a, v in zip(stats, moving))
    split.forward(x, UNFROZEN)  # training mode: they move
    assert not any(np.array_equal(a, v.numpy()) for a, v in zip(stats, moving))
    split.enter(UNFROZEN)
    assert not model.get_layer("block1a_bn").trainable and model.get_layer("block2a_bn").trainable


def test_an_unknown_unfreeze_from_is_one_line_naming_valid_layers():
    model = build_model("mobilenet_v3_small", (32, 32, 1), 3)
    assert unfreeze_problem(model, "expanded_conv_10_expand", "mobilenet_v3_small") == ""
    msg = unfreeze_problem(model, "conv5_block1", "mobilenet_v3_small")
    assert msg.count("\n") == 0 and msg.startswith("train.unfreeze_from='conv5_block1' is not a backbone layer of "
                                                   "train.model=mobilenet_v3_small: name one of its")
    assert "expanded_conv_4_expand" in msg
    with pytest.raises(ConfigError, match="is not a backbone layer"):
        Split(model, Schedule(unfreeze_from=HEAD_LAYER), "mobilenet_v3_small")  # the head is not the backbone


def test_an_unknown_unfreeze_from_fails_before_launch(spark, sample_config, ingested_sample, tmp_path):
    from pipeline import train

    cfg = sample_config.model_copy(update={"train": sample_config.train.model_copy(
        update={"freeze_epochs": 1, "unfreeze_from": "block9_conv"})})
    with pytest.raises(ConfigError) as exc:
        train.run(spark, cfg, data_uri=ingested_sample, model_dir="file://" + str(tmp_path / "m"))
    assert str(exc.value).startswith("train.unfreeze_from='block9_conv' is not a backbone layer of "
                                     "train.model=compact_cnn") and "block1a_conv" in str(exc.value)
    assert not (tmp_path / "m").exists()


def test_large_model_keys_reach_horovod_and_are_validated():
    from pipeline.config import load_config
    from pipeline.train import horovod_env

    assert "HOROVOD_FUSION_THRESHOLD" not in horovod_env(load_config())
    assert horovod_env(load_config(overrides=["train.fusion_threshold_mb=128"]))["HOROVOD_FUSION_THRESHOLD"] == str(
        128 * 1024 * 1024)
    for bad in ("train.compression=bf16", "train.accumulate_steps=0", "train.backbone_lr_multiplier=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(overrides=[bad])


def test_history_has_a_phase_column_and_the_curves_mark_the_boundary():
    from pipeline.train.outputs import curves_png, history_csv, phase_boundaries

    rows = [{"epoch": e, "phase": p, "train_loss": 1.0 / e, "train_accuracy": 0.5, "val_loss": None,
             "val_accuracy": None} for e, p in ((1, FROZEN), (2, FROZEN), (3, UNFROZEN))]
    assert [r["phase"] for r in csv.DictReader(io.StringIO(history_csv(rows)))] == [FROZEN, FROZEN, UNFROZEN]
    assert phase_boundaries(rows) == [2.5]
    assert phase_boundaries([{"epoch": 1}, {"epoch": 2}]) == []  # histories written before the column
    assert curves_png(rows)[:8] == b"\x89PNG\r\n\x1a\n"


_MIXED = r"""
import json
import numpy as np, keras, tensorflow as tf
import horovod.tensorflow as hvd
from pipeline.config import load_config
from pipeline.train.finetune import FROZEN, UNFROZEN, Schedule, Split
from pipeline.train.models import build_model
from pipeline.train.steps import TrainStep, build_optimizers

hvd.init()
keras.mixed_precision.set_global_policy("mixed_float16")
out = {}
for k in (1, 2):
    tc = load_config(overrides=["train.freeze_epochs=1", "train.backbone_lr_multiplier=0.1",
                                f"train.accumulate_steps={k}"]).train
    model = build_model("compact_cnn", (16, 16, 3), 3, dropout=0.0)
    split = Split(model, Schedule.from_config(tc), tc.model)
    opts = build_optimizers(tc, model, split, mixed=True)
    x = tf.random.stateless_normal((8, 16, 16, 3), seed=(1, 2))
    y = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])
    steps = {}
    for phase in (FROZEN, UNFROZEN):
        steps[phase] = TrainStep(hvd, model, opts, rate=lambda it: tf.constant(1e-3, tf.float64), num_classes=3,
                                 label_smoothing=0.0, mixed=True, accumulate_steps=k, phase=phase, split=split,
                                 backbone_lr_multiplier=0.1)
        loss = steps[phase]([(x, y)] * k)[0]
    before = [v.numpy().copy() for v in model.trainable_variables]
    opts.head.dynamic_scale.assign(2.0 ** 100)  # float16 gradients overflow: the step must be skipped
    steps[UNFROZEN]([(x, y)] * k)
    out[k] = {"loss": float(loss), "counts": [int(opts.head.iterations.numpy()), int(opts.backbone.iterations.numpy())],
              "scale_after_overflow": float(opts.head.dynamic_scale.numpy()),
              "skipped": all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.trainable_variables))}
print(json.dumps(out))
"""


def test_mixed_precision_loss_scaling_with_two_optimizers_and_accumulation(tmp_path, repo_root):
    """mixed_float16 on CPU, Horovod of size 1: the LossScaleOptimizer's ``dynamic_scale`` serves both optimizers."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MIXED], capture_output=True, text=True, timeout=300, cwd=repo_root,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for k in ("1", "2"):
        assert np.isfinite(res[k]["loss"]), res
        assert res[k]["counts"] == [2, 1], res  # head: a frozen and an unfrozen step; backbone: the unfrozen one
        assert res[k]["skipped"] is True and res[k]["scale_after_overflow"] == 2.0 ** 99, res


# --- slow: real training on 2 Horovod ranks ------------------------------------------------------


def _cfg(sample_config, **train):
    return sample_config.model_copy(update={"train": sample_config.train.model_copy(update=train)})


def _layer_weights(path: Path, model) -> dict:
    """``{layer name: [arrays]}`` of a ``model.weights.h5`` loaded into ``model``."""
    model.load_weights(str(path))
    return {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers
            if layer.weights and "dropout" not in layer.name}  # not the dropout layers' seed states


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_freeze_then_unfreeze_on_two_ranks_with_resumes_on_both_sides(spark, sample_config, ingested_sample,
                                                                      tmp_path):
    """freeze_epochs=2, unfreeze from block2a_conv: epochs 1 | 2 -> 3 | 4, three launches."""
    from pipeline import train

    start = build_model("compact_cnn", (16, 16, 3), 3, dropout=0.25)
    start.save_weights(str(tmp_path / "start.weights.h5"))
    model_dir = tmp_path / "m"
    base = dict(init_weights="file://" + str(tmp_path / "start.weights.h5"), freeze_epochs=2,
                unfreeze_from="block2a_conv", backbone_lr_multiplier=0.5, keep_checkpoints=10, warmup_epochs=0)
    runs = [train.run(spark, _cfg(sample_config, epochs=epochs, **base), data_uri=ingested_sample,
                      model_dir="file://" + str(model_dir)) for epochs in (1, 3, 4)]
    assert [(r["resumed_from"], r["epochs_run"]) for r in runs] == [(None, 1), ("epoch-0001", 2), ("epoch-0003", 1)]
    for r in runs:
        assert r["weights_sha256"][0] == r["weights_sha256"][1]

    rows = list(csv.DictReader((model_dir / "history.csv").open()))
    assert [r["phase"] for r in rows] == [FROZEN, FROZEN, UNFROZEN, UNFROZEN]
    lrs = [float(r["learning_rate"]) for r in rows]
    assert lrs == [pytest.approx(2e-3)] * 4  # the head's rate; the backbone's is half of it

    ck = model_dir / "checkpoints"
    w0 = {layer.name: layer.get_weights() for layer in start.layers if layer.weights and "dropout" not in layer.name}
    probe = build_model("compact_cnn", (16, 16, 3), 3, dropout=0.25)
    w = {e: _layer_weights(ck / f"epoch-{e:04d}" / "model.weights.h5", probe) for e in (1, 2, 3, 4)}
    for e in (1, 2):  # frozen: every backbone weight (BatchNorm statistics included) as it started
        for name in w0:
            if name == HEAD_LAYER:
                assert not _same(w[e][name], w0[name]), (e, name)
            else:
                assert _same(w[e][name], w0[name]), (e, name)
    for e in (3, 4):  # unfrozen from block2a_conv: the layers before it still as they started
        for name in ("block1a_conv", "block1a_bn", "block1b_conv", "block1b_bn"):
            assert _same(w[e][name], w0[name]), (e, name)
        for name in ("block2a_conv", "block2b_bn", "fc", HEAD_LAYER):
            assert not _same(w[e][name], w[e - 1][name]), (e, name)
    # The backbone's optimizer came back from the epoch-3 checkpoint: Adam's step count is 2 epochs of updates.
    state = json.loads((ck / "epoch-0004" / "state.json").read_text())
    steps = state["global_step"] // 4
    opt = np.load(ck / "epoch-0004" / "optimizer.npz")
    counters = [int(opt[k]) for k in opt.files if opt[k].shape == () and opt[k].dtype.kind == "i"]
    assert counters == [4 * steps, 2 * steps], counters  # head: 4 epochs of steps, backbone: 2
    assert (model_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_fp16_compression_keeps_ranks_bit_identical(spark, sample_config, ingested_sample, tmp_path):
    from pipeline import train

    summary = train.run(spark, _cfg(sample_config, epochs=1, compression="fp16", fusion_threshold_mb=1),
                        data_uri=ingested_sample, model_dir="file://" + str(tmp_path / "m"))
    assert summary["weights_sha256"][0] == summary["weights_sha256"][1]
    assert np.isfinite(summary["metrics"]["train_loss"])


@pytest.mark.slow
def test_accumulating_two_batches_of_8_matches_one_batch_of_16(spark, sample_config, ingested_sample, tmp_path):
    """Backbone frozen (inference-mode BatchNorm) and no dropout or augmentation: deterministic enough."""
    import keras

    from pipeline import train

    cfg = sample_config.model_copy(update={"loader": sample_config.loader.model_copy(update={
        "augment": sample_config.loader.augment.model_copy(update={"flip_left_right": False})})})
    common = dict(epochs=2, freeze_epochs=2, dropout=0.0, warmup_epochs=0, learning_rate=0.005, optimizer="sgd",
                  restore_best=False)  # SGD: an update scales with the gradient (Adam would hide a wrong k)
    out = {}
    for name, k, b in (("acc", 2, 8), ("big", 1, 16)):
        out[name] = train.run(spark, _cfg(cfg, accumulate_steps=k, batch_size=b, **common), data_uri=ingested_sample,
                              model_dir="file://" + str(tmp_path / name))
        assert out[name]["weights_sha256"][0] == out[name]["weights_sha256"][1]
    rows = {n: list(csv.DictReader((tmp_path / n / "history.csv").open())) for n in out}
    for a, b in zip(rows["acc"], rows["big"]):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4)
    assert float(rows["big"][-1]["train_loss"]) < float(rows["big"][0]["train_loss"])  # the heads did train
    heads = [keras.saving.load_model(str(tmp_path / n / "model" / "model.keras")).get_layer(HEAD_LAYER).get_weights()
             for n in out]
    for x, y in zip(*heads):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)

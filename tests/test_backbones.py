"""Keras application backbones and ``train.init_weights``: build, preprocess, load weights, fail in one line.

Building a backbone costs seconds on CPU, so the default suite builds only the smallest
(``mobilenet_v3_small``) and the caffe preprocessing of the ResNets on its own. The slow tests
step two backbones (one per preprocessing kind) on 2 Horovod ranks in one launch, and build and
save every backbone and load them all in one fresh process that never imports pixelmill.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.train.models import BACKBONES, HEAD_LAYER, MODEL_NAMES, backbone_of, build_model

SMALL = "mobilenet_v3_small"


def _weights(model):
    return [w.copy() for w in model.get_weights()]


def _same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


# --- models ------------------------------------------------------------------------------


def test_config_accepts_exactly_the_model_names():
    from typing import get_args

    from pipeline.config import TrainConfig

    assert set(get_args(TrainConfig.model_fields["model"].annotation)) == set(MODEL_NAMES)
    assert {"resnet50", "resnet101", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_v2_b0",
            "convnext_tiny"} <= set(BACKBONES)


def test_caffe_preprocessing_layer_equals_keras_resnet_preprocess_input():
    import keras

    from pipeline.train.models import _caffe_preprocess

    inputs = keras.Input((4, 5, 3))
    model = keras.Model(inputs, _caffe_preprocess(inputs))
    x = np.random.default_rng(0).uniform(0, 255, size=(2, 4, 5, 3)).astype("float32")
    want = keras.applications.resnet.preprocess_input(x.copy())
    np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=1e-5, atol=1e-3)
    assert model.layers[-1].trainable is False


def test_backbone_takes_grey_pixels_round_trips_safe_mode_and_keeps_a_float32_softmax(tmp_path):
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model(SMALL, (32, 32, 1), 4, dropout=0.2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[-1].name == HEAD_LAYER and model.layers[-1].dtype_policy.compute_dtype == "float32"
    assert [layer.name for layer in model.layers][:2] == ["image", "grey_to_rgb"]
    assert backbone_of(model) is not None and backbone_of(model).input_shape == (None, 32, 32, 3)
    assert not any(type(layer).__name__ == "Lambda" for layer in model.layers)
    x = np.random.default_rng(0).uniform(0, 255, size=(3, 32, 32, 1)).astype("float32")
    p = model.predict(x, verbose=0)
    assert p.dtype == np.float32 and p.shape == (3, 4)
    np.testing.assert_allclose(p.sum(axis=1), np.ones(3), rtol=1e-3)
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path, safe_mode=True).predict(x, verbose=0), p, atol=1e-5)


def test_inputs_below_the_backbone_minimum_are_one_config_line():
    with pytest.raises(ConfigError) as exc:
        build_model("resnet50", (28, 28, 1), 10)
    assert str(exc.value) == ("train.model=resnet50 needs images of at least 32x32 but --data holds 28x28: "
                              "re-ingest with ingest.height/width >= 32")


def test_backbones_train_on_raw_pixels_whatever_loader_normalize_says():
    from pipeline.config import load_config
    from pipeline.train.models import for_model

    cfg = for_model(load_config(overrides=["train.model=resnet50", "loader.normalize=manifest"]))
    assert cfg.loader.normalize == "none"
    plain = load_config(overrides=["loader.normalize=unit"])
    assert for_model(plain) is plain


# --- init_weights -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return build_model(SMALL, (32, 32, 3), 3)


def _fresh():
    return build_model(SMALL, (32, 32, 3), 3)


def _write_legacy_h5(model, path: Path) -> None:
    """A no-top file in the layout Keras' ImageNet files use (legacy HDF5 weights)."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)


def test_imagenet_reads_the_keras_cache_file_and_nothing_else(tmp_path, monkeypatch, small_model):
    from pipeline.train.init_weights import apply, resolve

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    with pytest.raises(ConfigError) as exc:
        resolve("imagenet", _fresh(), {"a": 0, "b": 1, "c": 2}, model_name=SMALL)
    folder = tmp_path / "kh" / "models"
    assert str(exc.value).count("\n") == 0
    assert f"weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5 is not in {folder}/" in str(exc.value)
    folder.mkdir(parents=True)
    _write_legacy_h5(backbone_of(small_model), folder / BACKBONES[SMALL].weights_file)
    target = _fresh()
    source = resolve("imagenet", target, {"a": 0, "b": 1, "c": 2}, model_name=SMALL)
    assert (source.kind, source.loaded) == ("imagenet", "backbone")
    assert source.uri == "file://" + str(folder / BACKBONES[SMALL].weights_file) and len(source.sha256) == 64
    assert _same(backbone_of(target).get_weights(), backbone_of(small_model).get_weights())
    again = _fresh()
    apply(again, source, model_name=SMALL)
    assert _same(backbone_of(again).get_weights(), backbone_of(small_model).get_weights())

    # A file of that name holding another architecture: one line naming a layer, never a download.
    _write_legacy_h5(backbone_of(build_model("mobilenet_v3_large", (32, 32, 3), 3)),
                     folder / BACKBONES[SMALL].weights_file)
    with pytest.raises(ConfigError) as exc:
        resolve("imagenet", _fresh(), {"a": 0}, model_name=SMALL)
    assert str(exc.value).count("\n") == 0 and "layer" in str(exc.value).lower(), str(exc.value)


def test_imagenet_needs_a_backbone():
    from pipeline.train.init_weights import resolve

    with pytest.raises(ConfigError, match="needs a Keras application backbone"):
        resolve("imagenet", None, {}, model_name="compact_cnn")


def test_weights_file_uri_loads_the_backbone_and_a_mismatch_names_the_layer(tmp_path, small_model):
    from pipeline.train.init_weights import resolve

    path = tmp_path / "bb.weights.h5"
    backbone_of(small_model).save_weights(str(path))
    target = _fresh()
    head_before = target.get_layer(HEAD_LAYER).get_weights()
    source = resolve("file://" + str(path), target, {"a": 0, "b": 1, "c": 2}, model_name=SMALL)
    assert (source.kind, source.loaded) == ("file", "backbone")
    assert _same(backbone_of(target).get_weights(), backbone_of(small_model).get_weights())
    assert _same(target.get_layer(HEAD_LAYER).get_weights(), head_before)

    whole = tmp_path / "whole.keras"
    small_model.save(str(whole))
    target = _fresh()
    resolve(str(whole), target, {"a": 0, "b": 1, "c": 2}, model_name=SMALL)
    assert _same(backbone_of(target).get_weights(), backbone_of(small_model).get_weights())

    other = build_model("mobilenet_v3_large", (32, 32, 3), 3)
    for bad in (tmp_path / "large.weights.h5", tmp_path / "large.keras"):
        if bad.suffix == ".keras":
            other.save(str(bad))
        else:
            backbone_of(other).save_weights(str(bad))
        with pytest.raises(ConfigError) as exc:
            resolve(str(bad), _fresh(), {"a": 0}, model_name=SMALL)
        msg = str(exc.value)
        assert msg.count("\n") == 0 and f"train.init_weights file://{bad} does not fit" in msg
        assert "layer" in msg.lower(), msg


def _model_dir(tmp_path: Path, model, classes) -> str:
    from pipeline.contracts import model_file_uri, write_model_card
    from pipeline.fs import filesystem

    uri = "file://" + str(tmp_path / "earlier")
    fs = filesystem(uri)
    local = tmp_path / "m.keras"
    model.save(str(local))
    fs.write_bytes(model_file_uri(uri), local.read_bytes())
    write_model_card(fs, uri, {"model_id": "x", "classes": classes, "normalization": {"mean": [0.0] * 3,
                                                                                       "std": [1.0] * 3},
                               "image": {"height": 32, "width": 32, "channels": 3, "format": "png"},
                               "config": {"train": {"model": SMALL}}})
    return uri


def test_warm_start_keeps_the_head_only_when_the_classes_match(tmp_path, small_model):
    from pipeline.train.init_weights import resolve

    uri = _model_dir(tmp_path, small_model, {"a": 0, "b": 1, "c": 2})
    same = _fresh()
    src = resolve(uri, same, {"a": 0, "b": 1, "c": 2}, model_name=SMALL)
    assert (src.kind, src.loaded, src.model_dir) == ("model_dir", "all", uri)
    assert src.uri == uri + "/model/model.keras"
    assert _same(same.get_weights(), small_model.get_weights())

    other = build_model(SMALL, (32, 32, 3), 5)
    head = other.get_layer(HEAD_LAYER).get_weights()
    src = resolve(uri, other, {f"k{i}": i for i in range(5)}, model_name=SMALL)
    assert src.loaded == "backbone"
    assert _same(backbone_of(other).get_weights(), backbone_of(small_model).get_weights())
    assert _same(other.get_layer(HEAD_LAYER).get_weights(), head)

    with pytest.raises(ConfigError, match="holds a mobilenet_v3_small model but train.model is convnext_tiny"):
        resolve(uri, None, {"a": 0}, model_name="convnext_tiny")
    with pytest.raises(ConfigError, match="neither a weights file"):
        resolve("file://" + str(tmp_path), None, {"a": 0}, model_name=SMALL)


# --- slow: two backbones on 2 Horovod ranks, every backbone in a fresh process, the CLI ------

#: One backbone per preprocessing kind: the application's own layers, and caffe (fed grey images).
STEPPED = {"mobilenet_v3_small": 3, "resnet50": 1}


@pytest.mark.slow
def test_two_backbones_step_on_two_ranks_to_identical_weights(spark):
    """One launch, one eager ``hvd.DistributedGradientTape`` step per backbone, batch 2 at 32x32."""
    import horovod.spark

    stepped = dict(STEPPED)

    def step_backbones():
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras

        import horovod.tensorflow as hvd
        from pipeline.train.models import BACKBONES, build_model
        from pipeline.train.outputs import weights_digest

        hvd.init()
        rank, out = hvd.rank(), {}
        loss_obj = keras.losses.CategoricalCrossentropy()
        for i, (name, channels) in enumerate(stepped.items()):
            size = BACKBONES[name].min_size
            keras.utils.set_random_seed(100 + rank)  # different on each rank: the broadcast must fix it
            model = build_model(name, (size, size, channels), 3)
            optimizer = keras.optimizers.Adam(1e-3)
            optimizer.build(model.trainable_variables)
            for v in [*model.variables, *optimizer.variables]:
                v.assign(hvd.broadcast(v.value, root_rank=0, name=f"{name}_init_{v.path}"))
            x = tf.random.stateless_uniform((2, size, size, channels), seed=(rank, i), maxval=255.0)
            y = tf.one_hot(tf.constant([rank, 2 - rank], tf.int32), 3)
            with tf.GradientTape() as tape:  # eager: no tracing of a whole application per rank
                loss = loss_obj(y, model(x, training=True))
            tape = hvd.DistributedGradientTape(tape)
            grads = tape.gradient(loss, [v.value for v in model.trainable_variables])
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            for v in model.non_trainable_variables:  # BatchNorm statistics saw each rank's own batch
                v.assign(hvd.allreduce(v.value, op=hvd.Average, name=f"{name}_sync_{v.path}"))
            out[name] = {"digest": weights_digest([v.numpy() for v in model.variables]), "loss": float(loss),
                         "steps": int(optimizer.iterations.numpy())}
        return out

    results = horovod.spark.run(step_backbones, num_proc=2, use_gloo=True, nics=["lo"], start_timeout=120,
                                env={"TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "1"})
    assert len(results) == 2
    for name in STEPPED:
        assert results[0][name]["digest"] == results[1][name]["digest"], name
        assert results[0][name]["steps"] == results[1][name]["steps"] == 1, name
        assert np.isfinite(results[0][name]["loss"]) and np.isfinite(results[1][name]["loss"]), name
        assert results[0][name]["loss"] != results[1][name]["loss"], name  # the ranks did see different batches


_LOAD_ALL = r"""
import json, sys
import numpy as np
import keras
out = {}
for path in sys.argv[1:]:
    model = keras.saving.load_model(path, safe_mode=True)
    x = np.load(path[:-len(".keras")] + ".npy")
    out[path] = np.asarray(model(x, training=False)).tolist()
print(json.dumps({"probs": out, "modules": sorted(m for m in sys.modules if m.split(".")[0] == "pipeline")}))
"""


@pytest.mark.slow
def test_every_backbone_loads_in_safe_mode_in_a_process_without_pixelmill(tmp_path):
    """Each backbone at its minimum size, saved, loaded in ONE fresh process: the same predictions."""
    import os

    paths, want = [], {}
    for i, (name, bb) in enumerate(BACKBONES.items()):
        channels = 1 if i % 2 else 3  # half of them fed grey images
        model = build_model(name, (bb.min_size, bb.min_size, channels), 3)
        x = np.random.default_rng(i).uniform(0, 255, size=(2, bb.min_size, bb.min_size, channels)).astype("float32")
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        np.save(str(tmp_path / f"{name}.npy"), x)
        want[path] = np.asarray(model(x, training=False))
        paths.append(path)
        del model
    out = subprocess.run([sys.executable, "-c", _LOAD_ALL, *paths], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3",
                                            "HOME": str(tmp_path), "OMP_NUM_THREADS": os.environ.get(
                                                "OMP_NUM_THREADS", "2")})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["modules"] == []
    for path in paths:
        got = np.asarray(res["probs"][path], np.float32)
        assert got.shape == (2, 3), path
        np.testing.assert_allclose(got, want[path], rtol=1e-4, atol=1e-5, err_msg=path)
        np.testing.assert_allclose(got.sum(axis=1), [1.0, 1.0], atol=1e-4, err_msg=path)


@pytest.fixture(scope="module")
def ingested_32(spark, raw_sample, sample_config, tmp_path_factory) -> str:
    """The sample corpus ingested at 32x32, the backbones' minimum."""
    from pipeline import ingest
    from pipeline.config import load_config

    cfg = load_config(["local.yaml"], ["spark.ui_enabled=false", "ingest.height=32", "ingest.width=32",
                                       "ingest.color_mode=RGB", "ingest.max_train_procs=2"])
    out = "file://" + str(tmp_path_factory.mktemp("ingested32") / "out")
    ingest.run(spark, cfg, input_uri="file://" + str(raw_sample), output_uri=out, mode="error")
    return out


def test_a_backbone_on_too_small_images_fails_before_launch(spark, sample_config, ingested_sample, tmp_path):
    from pipeline import train

    cfg = sample_config.model_copy(update={"train": sample_config.train.model_copy(update={"model": "resnet50"})})
    with pytest.raises(ConfigError) as exc:
        train.run(spark, cfg, data_uri=ingested_sample, model_dir="file://" + str(tmp_path / "m"))
    assert str(exc.value).startswith("train.model=resnet50 needs images of at least 32x32 but --data holds 16x16")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_imagenet", "mismatched_file"])
def test_cli_refuses_missing_or_mismatched_weights_in_one_line(ingested_32, tmp_path, repo_root, case):
    import os

    if case == "missing_imagenet":
        init, needle = "imagenet", (f"{BACKBONES[SMALL].weights_file} is not in {tmp_path / 'kh' / 'models'}/")
    else:
        bad = tmp_path / "large.weights.h5"
        backbone_of(build_model("mobilenet_v3_large", (32, 32, 3), 3)).save_weights(str(bad))
        init, needle = str(bad), "does not fit train.model=mobilenet_v3_small: layer "
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--data", ingested_32, "--model-dir", str(tmp_path / "m"),
         "--config", "local.yaml", "--set", "spark.ui_enabled=false", "--set", "train.batch_size=8",
         "--set", f"train.model={SMALL}", "--set", f"train.init_weights={init}"],
        capture_output=True, text=True, timeout=600, cwd=repo_root,
        env=dict(os.environ, KERAS_HOME=str(tmp_path / "kh")))
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pixelmill train: error: train.init_weights") and needle in last, last
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_training_a_backbone_warm_started_from_a_weights_file_records_it(spark, sample_config, ingested_32,
                                                                        tmp_path):
    import hashlib

    from pipeline import train

    start = tmp_path / "start.weights.h5"
    backbone_of(build_model(SMALL, (32, 32, 3), 3)).save_weights(str(start))
    cfg = sample_config.model_copy(update={"train": sample_config.train.model_copy(
        update={"model": SMALL, "epochs": 1, "batch_size": 8, "init_weights": "file://" + str(start)})})
    model_dir = tmp_path / "m"
    summary = train.run(spark, cfg, data_uri=ingested_32, model_dir="file://" + str(model_dir))
    assert summary["weights_sha256"][0] == summary["weights_sha256"][1]
    card = json.loads((model_dir / "model.json").read_text())
    assert card["init_weights"] == {"kind": "file", "uri": "file://" + str(start), "loaded": "backbone",
                                    "sha256": hashlib.sha256(start.read_bytes()).hexdigest()}
    assert card["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert card["config"]["loader"]["normalize"] == "none"

"""The model factory: standard layers only, safe-mode loadable, softmax outputs."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.train.models import MODEL_NAMES, build_model


@pytest.mark.parametrize("name, shape, classes", [("compact_cnn", (28, 28, 1), 10), ("compact_cnn", (64, 64, 3), 5),
                                                  ("resnet", (32, 32, 3), 4), ("resnet", (96, 96, 3), 3)])
def test_models_round_trip_through_safe_mode_and_predict_probabilities(tmp_path, name, shape, classes):
    import keras

    model = build_model(name, shape, classes, dropout=0.25)
    assert model.input_shape == (None, *shape) and model.output_shape == (None, classes)
    # Only built-in Keras layers: what safe_mode=True loads without pixelmill code.
    assert all(type(layer).__module__.startswith("keras.") for layer in model.layers)
    assert not any(type(layer).__name__ == "Lambda" for layer in model.layers)
    x = np.random.default_rng(0).normal(size=(3, *shape)).astype("float32")
    p = model.predict(x, verbose=0)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), np.ones(3), rtol=1e-5)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), p, rtol=1e-5, atol=1e-6)


def test_compact_cnn_is_compact():
    params = build_model("compact_cnn", (28, 28, 1), 10).count_params()
    assert 100_000 < params < 1_000_000


def test_compact_cnn_width_and_convs_per_block_shape_the_network():
    from keras import layers

    def convs(model):
        return [(l.name, l.filters) for l in model.layers if isinstance(l, layers.Conv2D)]

    assert convs(build_model("compact_cnn", (28, 28, 1), 10)) == [
        ("block1a_conv", 32), ("block1b_conv", 32), ("block2a_conv", 64), ("block2b_conv", 64)]
    small = build_model("compact_cnn", (28, 28, 1), 10, width=24, convs_per_block=1)
    assert convs(small) == [("block1a_conv", 24), ("block2a_conv", 48)]
    assert convs(build_model("compact_cnn", (64, 64, 3), 5, width=16, convs_per_block=1)) == [
        ("block1a_conv", 16), ("block2a_conv", 32), ("block3a_conv", 64), ("block4a_conv", 64)]
    with pytest.raises(ConfigError, match="convs per block"):
        build_model("compact_cnn", (28, 28, 1), 10, convs_per_block=0)


def test_softmax_stays_float32_under_mixed_precision():
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("compact_cnn", (16, 16, 3), 3)
        assert model.layers[-1].dtype_policy.compute_dtype == "float32"
        assert model.layers[1].dtype_policy.compute_dtype == "float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("args, needle", [(("vgg", (28, 28, 1), 10), "'train.model'"),
                                          (("compact_cnn", (28, 28, 1), 1), "at least 2 classes"),
                                          (("resnet", (28, 28), 3), "(height, width, channels)")])
def test_bad_arguments_name_the_problem(args, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        build_model(*args)
    assert needle in str(exc.value)
    assert {"compact_cnn", "resnet"} <= set(MODEL_NAMES)

"""Keras 3 model factory for image classification.

Every model is built only from standard Keras layers (no ``Lambda``, no custom
classes), so the exported ``model.keras`` loads with
``keras.saving.load_model(path, safe_mode=True)`` in a process that has never
imported pixelmill (see docs/contracts.md, "Training output").

Inputs are float32 ``(height, width, channels)`` images; outputs are class probabilities
(a float32 softmax, also under mixed precision). ``compact_cnn`` and ``resnet`` take pixels
normalised by the loader (``loader.normalize``); the Keras application backbones
(:data:`BACKBONES`) take raw 0..255 pixels and carry their own preprocessing as layers,
so training and scoring feed them the same thing (see :func:`for_model`).

>>> model = build_model("compact_cnn", (28, 28, 1), 10)  # doctest: +SKIP
>>> model.output_shape  # doctest: +SKIP
(None, 10)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Tuple

if TYPE_CHECKING:  # pragma: no cover
    import keras

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    """A Keras application used as a pretrained-capable backbone (``include_top=False``)."""

    #: ``keras.applications`` constructor.
    factory: str
    #: The standard ImageNet no-top weight file, as Keras names it in ``$KERAS_HOME/models/``.
    weights_file: str
    #: ``caffe``: BGR mean subtraction built here as layers; ``included``: the application's own
    #: ``include_preprocessing`` layers (0..255 in).
    preprocessing: str
    #: Smallest height/width the application accepts.
    min_size: int = 32


#: ``train.model`` names of the Keras application backbones.
BACKBONES: Dict[str, Backbone] = {
    "resnet50": Backbone("ResNet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "caffe"),
    "resnet101": Backbone("ResNet101", "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", "caffe"),
    "mobilenet_v3_small": Backbone("MobileNetV3Small", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                                   "included"),
    "mobilenet_v3_large": Backbone("MobileNetV3Large", "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
                                   "included"),
    "efficientnet_v2_b0": Backbone("EfficientNetV2B0", "efficientnetv2-b0_notop.h5", "included"),
    "convnext_tiny": Backbone("ConvNeXtTiny", "convnext_tiny_notop.h5", "included"),
}
MODEL_NAMES = ("compact_cnn", "resnet", *BACKBONES)
#: Name of the classifier layer (replaced by a new one when a warm start changes the classes).
HEAD_LAYER = "probabilities"
#: Caffe-style ImageNet means, in BGR order (what ``keras.applications.resnet.preprocess_input`` subtracts).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
#: BatchNorm moving-average momentum: 0.9 (not Keras' 0.99) so the inference statistics
#: are usable after tens of steps, as in short or small-data runs.
BN_MOMENTUM = 0.9


def _regularizer(weight_decay: float) -> Any:
    import keras

    return keras.regularizers.L2(weight_decay) if weight_decay > 0 else None


def _conv_bn_relu(x: Any, filters: int, *, name: str, weight_decay: float, strides: int = 1) -> Any:
    import keras
    from keras import layers

    x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                      kernel_initializer="he_normal", kernel_regularizer=_regularizer(weight_decay),
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _classifier_head(x: Any, num_classes: int, *, dropout: float, name: str = "classifier") -> Any:
    from keras import layers

    if dropout > 0:
        x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    # float32 softmax: probabilities stay exact under a mixed_float16 policy.
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name=HEAD_LAYER)(x)


def compact_cnn(input_shape: Tuple[int, int, int], num_classes: int, *, dropout: float = 0.25,
                weight_decay: float = 0.0, width: int = 32, convs_per_block: int = 2) -> "keras.Model":
    """A small VGG-style CNN for small images (Fashion-MNIST-sized and up).

    ``convs_per_block`` 3x3 conv + BN + ReLU layers per block, max-pooling
    between blocks (``width``, 2x, then at most 4x ``width`` filters while the
    feature map is larger than 7x7), then a 128-unit dense layer and a softmax.
    ``convs_per_block=1`` costs about 3x fewer multiply-adds on 28x28 inputs.
    """
    import keras
    from keras import layers

    h, w, _ = input_shape
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    filters = int(width)
    block = 0
    while True:
        block += 1
        for i in range(int(convs_per_block)):
            x = _conv_bn_relu(x, filters, name=f"block{block}{'abcd'[i]}", weight_decay=weight_decay)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        h, w = h // 2, w // 2
        if dropout > 0:
            x = layers.Dropout(dropout / 2, name=f"block{block}_dropout")(x)
        if min(h, w) <= 7 or block >= 4:
            break
        filters = min(filters * 2, 4 * int(width))
    # Flatten keeps spatial detail on small inputs; on large ones average first.
    if h * w > 64:
        x = layers.GlobalAveragePooling2D(name="gap")(x)
    else:
        x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, kernel_initializer="he_normal", kernel_regularizer=_regularizer(weight_decay),
                     name="fc")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="fc_bn")(x)
    x = layers.Activation("relu", name="fc_relu")(x)
    outputs = _classifier_head(x, num_classes, dropout=min(0.5, dropout * 2))
    return keras.Model(inputs, outputs, name="compact_cnn")


def _residual_block(x: Any, filters: int, *, strides: int, name: str, weight_decay: float) -> Any:
    from keras import layers

    shortcut = x
    y = _conv_bn_relu(x, filters, strides=strides, name=f"{name}_1", weight_decay=weight_decay)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                      kernel_regularizer=_regularizer(weight_decay), name=f"{name}_2_conv")(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_2_bn")(y)
    if strides != 1 or int(shortcut.shape[-1]) != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False, kernel_initializer="he_normal",
                                 kernel_regularizer=_regularizer(weight_decay), name=f"{name}_proj_conv")(shortcut)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.Activation("relu", name=f"{name}_out")(y)


def resnet(input_shape: Tuple[int, int, int], num_classes: int, *, dropout: float = 0.25,
           weight_decay: float = 0.0) -> "keras.Model":
    """A ResNet-style network (basic blocks, 4 stages) for larger images.

    The stem downsamples by 4 when the input is at least 96 pixels on its
    short side (ImageNet-like sizes) and not at all on small inputs.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=tuple(input_shape), name="image")
    large = min(input_shape[0], input_shape[1]) >= 96
    x = _conv_bn_relu(inputs, 64 if large else 32, strides=2 if large else 1, name="stem",
                      weight_decay=weight_decay)
    if large:
        x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    widths = (64, 128, 256, 512) if large else (32, 64, 128, 256)
    for stage, filters in enumerate(widths, start=1):
        for block in range(2):
            strides = 2 if (block == 0 and stage > 1) else 1
            x = _residual_block(x, filters, strides=strides, name=f"stage{stage}_block{block + 1}",
                                weight_decay=weight_decay)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = _classifier_head(x, num_classes, dropout=dropout)
    return keras.Model(inputs, outputs, name="resnet")


def is_backbone(name: str) -> bool:
    return name in BACKBONES


def input_size_problem(name: str, height: int, width: int) -> str:
    """Empty when ``train.model=name`` accepts ``height x width`` images, else a one-line reason."""
    bb = BACKBONES.get(name)
    if bb is None or min(height, width) >= bb.min_size:
        return ""
    return (f"train.model={name} needs images of at least {bb.min_size}x{bb.min_size} but --data holds "
            f"{height}x{width}: re-ingest with ingest.height/width >= {bb.min_size}")


def for_model(cfg: Any) -> Any:
    """``cfg`` as training and the model card see it: backbones take raw 0..255 pixels.

    A backbone does its own preprocessing inside the model, so ``loader.normalize`` is
    ``none`` for it whatever the config says; other models keep ``loader.normalize``.
    """
    if not is_backbone(cfg.train.model) or cfg.loader.normalize == "none":
        return cfg
    log.info("train.model=%s preprocesses inside the model: the loader feeds raw 0..255 pixels "
             "(loader.normalize=%s is not used)", cfg.train.model, cfg.loader.normalize)
    return cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"normalize": "none"})})


def _caffe_preprocess(x: Any) -> Any:
    """RGB 0..255 -> BGR minus the ImageNet means: a frozen 1x1 convolution (safe-mode loadable)."""
    from keras import layers

    conv = layers.Conv2D(3, 1, use_bias=True, trainable=False, dtype="float32", name="caffe_preprocess")
    y = conv(x)
    import numpy as np

    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for out_channel in range(3):  # BGR output channel c reads RGB input channel 2 - c
        kernel[0, 0, 2 - out_channel, out_channel] = 1.0
    conv.set_weights([kernel, -np.asarray(CAFFE_MEAN_BGR, np.float32)])
    return y


def backbone_model(name: str, input_shape: Tuple[int, int, int], num_classes: int, *,
                   dropout: float = 0.25) -> "keras.Model":
    """A Keras application (random weights) between its preprocessing and a softmax head.

    ``image (0..255) -> [grey -> RGB] -> [caffe preprocessing] -> backbone -> global average
    pooling -> dropout -> float32 softmax``. The application is the one nested model
    (:func:`backbone_of`), under the name Keras gives it; its ImageNet file loads into it.
    """
    import keras
    from keras import layers

    from pipeline.errors import ConfigError

    bb = BACKBONES[name]
    h, w, c = input_shape
    problem = input_size_problem(name, h, w)
    if problem:
        raise ConfigError(problem)
    if c not in (1, 3):
        raise ConfigError(f"train.model={name} needs 1- or 3-channel images, --data has {c} channels")
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    if c == 1:  # grey images fill all three channels the application expects
        x = layers.Concatenate(axis=-1, name="grey_to_rgb")([x, x, x])
    if bb.preprocessing == "caffe":
        x = _caffe_preprocess(x)
    kwargs: Dict[str, Any] = {"include_preprocessing": True} if bb.preprocessing == "included" else {}
    application = getattr(keras.applications, bb.factory)(include_top=False, weights=None, input_shape=(h, w, 3),
                                                          **kwargs)
    x = application(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = _classifier_head(x, num_classes, dropout=dropout)
    return keras.Model(inputs, outputs, name=name)


def backbone_of(model: Any) -> Any:
    """The Keras application nested in a backbone model (None for ``compact_cnn`` / ``resnet``)."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested[0] if len(nested) == 1 else None


_FACTORIES: Dict[str, Callable[..., Any]] = {"compact_cnn": compact_cnn, "resnet": resnet}


def build_model(name: str, input_shape: Tuple[int, int, int], num_classes: int, *, dropout: float = 0.25,
                weight_decay: float = 0.0, width: int = 32, convs_per_block: int = 2) -> "keras.Model":
    """Build the model called ``name`` (one of :data:`MODEL_NAMES`).

    Parameters
    ----------
    name:
        ``compact_cnn`` (default, small images), ``resnet`` (larger images) or a Keras
        application backbone from :data:`BACKBONES` (:func:`backbone_model`).
    input_shape:
        ``(height, width, channels)`` from the ingest manifest.
    num_classes:
        Number of classes in the ingest manifest (>= 2).
    width, convs_per_block:
        ``compact_cnn`` only: first-block filters and convs per block (the others ignore them).
    weight_decay:
        L2 on the convolutions of ``compact_cnn`` and ``resnet`` (backbones ignore it).
    """
    from pipeline.errors import ConfigError

    if name not in MODEL_NAMES:
        raise ConfigError(f"config key 'train.model': unknown model {name!r} (allowed: {', '.join(MODEL_NAMES)})")
    if num_classes < 2:
        raise ConfigError(f"training needs at least 2 classes, the ingest manifest has {num_classes}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input shape must be (height, width, channels), got {input_shape}")
    if not 1 <= int(convs_per_block) <= 4 or int(width) < 1:
        raise ConfigError(f"compact_cnn needs width >= 1 and 1..4 convs per block, got width={width}, "
                          f"convs_per_block={convs_per_block}")
    if is_backbone(name):
        return backbone_model(name, shape, int(num_classes), dropout=dropout)
    if name == "compact_cnn":
        return compact_cnn(shape, int(num_classes), dropout=dropout, weight_decay=weight_decay, width=int(width),
                           convs_per_block=int(convs_per_block))
    return _FACTORIES[name](shape, int(num_classes), dropout=dropout, weight_decay=weight_decay)

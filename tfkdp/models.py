"""A small zoo of functional Keras 3 CNNs for CIFAR/Fashion-MNIST sized inputs.

Every model returns **logits** (no softmax): compile with
`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`. Layer names are
stable and descriptive (`stage2_block1_conv1`) so distillation hints and
pruning plans can refer to them.
"""

import keras
from keras import layers

__all__ = [
    "resnet_cifar", "vgg_cifar", "mobilenet_v2_cifar", "densenet_bc_cifar", "efficientnet_cifar",
    "get", "names",
]

_RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
_VGG_CONFIGS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
        512, 512, 512, "M", 512, 512, 512, "M",
    ),
}  # fmt: skip
# (expansion t, output channels c, repeats n, first stride s); CIFAR variant:
# stride 1 in the stem and in the second stage, as in Torch-Pruning's CIFAR zoo.
_MOBILENET_V2_CFG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _check_input(input_shape, num_classes):
    if len(tuple(input_shape)) != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) with positive sizes; "
            f"received input_shape={input_shape!r}"
        )
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2; received num_classes={num_classes!r}")


def _conv_bn(x, filters, kernel_size, strides, name, activation="relu"):
    x = layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False,
        kernel_initializer="he_normal", name=name,
    )(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    if activation:
        x = layers.Activation(activation, name=f"{name}_{activation}")(x)
    return x


def resnet_cifar(depth=20, width=16, input_shape=(28, 28, 1), num_classes=10, name=None):
    """CIFAR-style ResNet (He et al. 2016, Sec. 4.2) with batch norm.

    Three stages of `(depth - 2) / 6` basic blocks with `width`, `2*width` and
    `4*width` channels; a 1×1 projection shortcut (conv + BN) where the shape
    changes ("option B").

    Args:
        depth: total depth, one of 8, 14, 20, 32, 44, 56, 110 (any 6n+2).
        width: channels of the first stage.
        input_shape: `(height, width, channels)`.
        num_classes: number of output logits.
        name: model name; defaults to `resnet{depth}`.

    Returns:
        A functional `keras.Model` mapping images to logits.

    Raises:
        ValueError: if `depth` is not 6n+2 with n >= 1 or `width` < 1.

    Example:
        >>> model = resnet_cifar(20, input_shape=(32, 32, 3))
        >>> model.output_shape
        (None, 10)

    Reference:
        He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"resnet depth must be 6n+2 with n >= 1 (e.g. {_RESNET_DEPTHS}); received depth={depth!r}"
        )
    if int(width) < 1:
        raise ValueError(f"width must be a positive integer; received width={width!r}")
    _check_input(input_shape, num_classes)
    blocks = (depth - 2) // 6
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv_bn(inputs, width, 3, 1, "stem_conv")
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks):
            prefix = f"stage{stage + 1}_block{block + 1}"
            strides = 2 if (stage > 0 and block == 0) else 1
            shortcut = x
            y = _conv_bn(x, filters, 3, strides, f"{prefix}_conv1")
            y = _conv_bn(y, filters, 3, 1, f"{prefix}_conv2", activation=None)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = _conv_bn(shortcut, filters, 1, strides, f"{prefix}_proj", activation=None)
            x = layers.Add(name=f"{prefix}_add")([shortcut, y])
            x = layers.Activation("relu", name=f"{prefix}_out")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def vgg_cifar(depth=11, width_multiplier=1.0, input_shape=(28, 28, 1), num_classes=10, name=None):
    """VGG with batch norm for small images (Simonyan & Zisserman 2015).

    Max pooling uses `padding="same"` so 28×28 inputs survive all five pools;
    the classifier is `Flatten → Dense`, as in the CIFAR VGG of network slimming.

    Args:
        depth: 11, 13 or 16.
        width_multiplier: scales every conv's channels (rounded, at least 1).
        input_shape: `(height, width, channels)`.
        num_classes: number of output logits.
        name: model name; defaults to `vgg{depth}`.

    Returns:
        A functional `keras.Model` mapping images to logits.

    Raises:
        ValueError: for an unknown depth or a non-positive width multiplier.

    Example:
        >>> vgg_cifar(11, width_multiplier=0.25).output_shape
        (None, 10)

    Reference:
        Simonyan & Zisserman, "Very Deep Convolutional Networks", ICLR 2015.
    """
    if depth not in _VGG_CONFIGS:
        raise ValueError(f"vgg depth must be one of {sorted(_VGG_CONFIGS)}; received depth={depth!r}")
    if not width_multiplier > 0:
        raise ValueError(
            f"width_multiplier must be > 0; received width_multiplier={width_multiplier!r}"
        )
    _check_input(input_shape, num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    conv_index, pool_index = 0, 0
    for item in _VGG_CONFIGS[depth]:
        if item == "M":
            pool_index += 1
            x = layers.MaxPooling2D(2, padding="same", name=f"pool{pool_index}")(x)
        else:
            conv_index += 1
            filters = max(1, int(round(item * width_multiplier)))
            x = _conv_bn(x, filters, 3, 1, f"block{pool_index + 1}_conv{conv_index}")
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or f"vgg{depth}")


def _make_divisible(value, divisor=8):
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # never round down by more than 10 %
        new_value += divisor
    return new_value


def mobilenet_v2_cifar(alpha=1.0, input_shape=(32, 32, 3), num_classes=10, name=None):
    """MobileNetV2 (Sandler et al. 2018) adapted to 32×32 inputs.

    Inverted residual blocks (1×1 expand, 3×3 depthwise, 1×1 linear project)
    with a residual `Add` where stride is 1 and channels match; ReLU6.
    Stride 1 in the stem and second stage (CIFAR variant); channel counts are
    multiples of 8.

    Args:
        alpha: width multiplier.
        input_shape: `(height, width, channels)`.
        num_classes: number of output logits.
        name: model name; defaults to `mobilenet_v2_cifar`.

    Returns:
        A functional `keras.Model` mapping images to logits.

    Raises:
        ValueError: if `alpha` <= 0.

    Example:
        >>> mobilenet_v2_cifar(0.5).output_shape
        (None, 10)

    Reference:
        Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0; received alpha={alpha!r}")
    _check_input(input_shape, num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    channels = _make_divisible(32 * alpha)
    x = _conv_bn(inputs, channels, 3, 1, "stem_conv", activation="relu6")
    block_id = 0
    for t, c, n, s in _MOBILENET_V2_CFG:
        out_channels = _make_divisible(c * alpha)
        for i in range(n):
            block_id += 1
            prefix = f"block{block_id}"
            strides = s if i == 0 else 1
            in_channels = x.shape[-1]
            y = x
            if t != 1:
                y = _conv_bn(y, in_channels * t, 1, 1, f"{prefix}_expand", activation="relu6")
            y = layers.DepthwiseConv2D(
                3, strides=strides, padding="same", use_bias=False, name=f"{prefix}_dwconv"
            )(y)
            y = layers.BatchNormalization(name=f"{prefix}_dw_bn")(y)
            y = layers.Activation("relu6", name=f"{prefix}_dw_relu6")(y)
            y = _conv_bn(y, out_channels, 1, 1, f"{prefix}_project", activation=None)
            if strides == 1 and in_channels == out_channels:
                y = layers.Add(name=f"{prefix}_add")([x, y])
            x = y
    last = _make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = _conv_bn(x, last, 1, 1, "head_conv", activation="relu6")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or "mobilenet_v2_cifar")


def densenet_bc_cifar(depth=40, growth_rate=12, compression=0.5, input_shape=(28, 28, 1),
                      num_classes=10, name=None):  # fmt: skip
    """DenseNet-BC for small images (Huang et al. 2017, CIFAR variant).

    A 3×3 stem conv with `2 * growth_rate` channels, then three dense blocks
    of `(depth - 4) / 6` bottleneck layers each (BN-ReLU-Conv1×1 to
    `4 * growth_rate`, BN-ReLU-Conv3×3 to `growth_rate`, concatenated to the
    block's input), joined by transitions (BN-ReLU-Conv1×1 to
    `floor(compression * channels)`, 2×2 average pooling); then BN-ReLU,
    global average pooling and a dense classifier. Pre-activation order, as
    in the paper.

    Args:
        depth: total depth, 6n+4 with n >= 1 (40 and 100 are the paper's
            CIFAR models: about 0.18 M and 0.8 M parameters at growth rate 12).
        growth_rate: channels each bottleneck layer adds (k).
        compression: transition reduction θ, in (0, 1].
        input_shape: `(height, width, channels)`.
        num_classes: number of output logits.
        name: model name; defaults to `densenet_bc{depth}`.

    Returns:
        A functional `keras.Model` mapping images to logits.

    Raises:
        ValueError: if `depth` is not 6n+4, `growth_rate` < 1 or
            `compression` outside (0, 1].

    Example:
        >>> densenet_bc_cifar(10, growth_rate=4).output_shape
        (None, 10)

    Reference:
        Huang, Liu, van der Maaten & Weinberger, "Densely Connected
        Convolutional Networks", CVPR 2017.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"densenet depth must be 6n+4 with n >= 1 (e.g. 40, 100); received depth={depth!r}")
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
        raise ValueError(f"growth_rate must be a positive integer; received growth_rate={growth_rate!r}")
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression must be in (0, 1]; received compression={compression!r}")
    _check_input(input_shape, num_classes)
    layers_per_block = (depth - 4) // 6
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = layers.Conv2D(
        2 * growth_rate, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
        name="stem_conv",
    )(inputs)  # fmt: skip

    def bn_relu_conv(y, filters, kernel_size, prefix):
        y = layers.BatchNormalization(name=f"{prefix}_bn")(y)
        y = layers.Activation("relu", name=f"{prefix}_relu")(y)
        return layers.Conv2D(
            filters, kernel_size, padding="same", use_bias=False, kernel_initializer="he_normal",
            name=f"{prefix}_conv",
        )(y)  # fmt: skip

    for block in range(3):
        for i in range(layers_per_block):
            prefix = f"block{block + 1}_layer{i + 1}"
            y = bn_relu_conv(x, 4 * growth_rate, 1, f"{prefix}_1")
            y = bn_relu_conv(y, growth_rate, 3, f"{prefix}_2")
            x = layers.Concatenate(name=f"{prefix}_concat")([x, y])
        if block < 2:
            prefix = f"transition{block + 1}"
            x = bn_relu_conv(x, max(1, int(x.shape[-1] * compression)), 1, prefix)
            x = layers.AveragePooling2D(2, padding="same", name=f"{prefix}_pool")(x)
    x = layers.BatchNormalization(name="final_bn")(x)
    x = layers.Activation("relu", name="final_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or f"densenet_bc{depth}")


# (expansion t, kernel k, output channels c, repeats n, first stride s): EfficientNet-B0's
# stages, with stride 1 in the stem and the second stage for 32×32 inputs (as MobileNetV2 here).
_EFFICIENTNET_CFG = (
    (1, 3, 16, 1, 1),
    (6, 3, 24, 2, 1),
    (6, 5, 40, 2, 2),
    (6, 3, 80, 3, 2),
    (6, 5, 112, 3, 1),
    (6, 5, 192, 4, 2),
    (6, 3, 320, 1, 1),
)


def efficientnet_cifar(alpha=0.5, depth_coefficient=0.5, input_shape=(32, 32, 3), num_classes=10,
                       name=None):  # fmt: skip
    """An EfficientNet-style network for small images: MBConv blocks with squeeze-excitation.

    EfficientNet-B0's seven stages of MBConv blocks (1×1 expand, k×k
    depthwise, squeeze-excitation, 1×1 linear project; residual `Add` where
    stride is 1 and channels match), swish activations, scaled in width by
    `alpha` (channels rounded to multiples of 8) and in depth by
    `depth_coefficient` (repeats rounded up). The squeeze-excitation is
    global average pooling (kept dims), a 1×1 conv to a quarter of the
    block's input channels with swish, a 1×1 conv back with sigmoid, and a
    `Multiply`. No stochastic depth, no dropout (small-data training here).
    The defaults (0.5, 0.5) give about 0.68 M parameters and 21 M MACs at 32×32×3.

    Args:
        alpha: width multiplier (> 0).
        depth_coefficient: depth multiplier of the repeats (> 0).
        input_shape: `(height, width, channels)`.
        num_classes: number of output logits.
        name: model name; defaults to `efficientnet_cifar`.

    Returns:
        A functional `keras.Model` mapping images to logits.

    Raises:
        ValueError: if `alpha` or `depth_coefficient` <= 0.

    Example:
        >>> efficientnet_cifar(0.25, 0.25).output_shape
        (None, 10)

    Reference:
        Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional
        Neural Networks", ICML 2019; Hu et al., "Squeeze-and-Excitation
        Networks", CVPR 2018.
    """
    import math

    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be > 0; received alpha={alpha!r}")
    if (isinstance(depth_coefficient, bool) or not isinstance(depth_coefficient, (int, float))
            or not depth_coefficient > 0):  # fmt: skip
        raise ValueError(f"depth_coefficient must be > 0; received depth_coefficient={depth_coefficient!r}")
    _check_input(input_shape, num_classes)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv_bn(inputs, _make_divisible(32 * alpha), 3, 1, "stem_conv", activation="swish")
    block_id = 0
    for t, k, c, n, s in _EFFICIENTNET_CFG:
        out_channels = _make_divisible(c * alpha)
        for i in range(max(1, int(math.ceil(n * depth_coefficient)))):
            block_id += 1
            prefix = f"block{block_id}"
            strides = s if i == 0 else 1
            in_channels = x.shape[-1]
            y = x
            if t != 1:
                y = _conv_bn(y, in_channels * t, 1, 1, f"{prefix}_expand", activation="swish")
            y = layers.DepthwiseConv2D(
                k, strides=strides, padding="same", use_bias=False, name=f"{prefix}_dwconv"
            )(y)
            y = layers.BatchNormalization(name=f"{prefix}_dw_bn")(y)
            y = layers.Activation("swish", name=f"{prefix}_dw_swish")(y)
            se = layers.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}_se_squeeze")(y)
            se = layers.Conv2D(
                max(1, in_channels // 4), 1, activation="swish", name=f"{prefix}_se_reduce"
            )(se)
            se = layers.Conv2D(y.shape[-1], 1, activation="sigmoid", name=f"{prefix}_se_expand")(se)
            y = layers.Multiply(name=f"{prefix}_se_excite")([y, se])
            y = _conv_bn(y, out_channels, 1, 1, f"{prefix}_project", activation=None)
            if strides == 1 and in_channels == out_channels:
                y = layers.Add(name=f"{prefix}_add")([x, y])
            x = y
    x = _conv_bn(x, _make_divisible(1280 * alpha), 1, 1, "head_conv", activation="swish")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name or "efficientnet_cifar")


def _resnet(depth):
    def build(**kwargs):
        return resnet_cifar(depth, **kwargs)

    return build


def _vgg(depth):
    def build(**kwargs):
        return vgg_cifar(depth, **kwargs)

    return build


_REGISTRY = {f"resnet{d}": _resnet(d) for d in _RESNET_DEPTHS}
_REGISTRY.update({f"vgg{d}": _vgg(d) for d in sorted(_VGG_CONFIGS)})
_REGISTRY["mobilenet_v2_cifar"] = mobilenet_v2_cifar
_REGISTRY["densenet_bc_cifar"] = densenet_bc_cifar
_REGISTRY["efficientnet_cifar"] = efficientnet_cifar


def names():
    """Returns the sorted names accepted by `get`."""
    return sorted(_REGISTRY)


def get(name, **kwargs):
    """Builds a zoo model by name.

    Args:
        name: e.g. `"resnet20"`, `"vgg11"`, `"mobilenet_v2_cifar"`, `"densenet_bc_cifar"`,
            `"efficientnet_cifar"` (see `names()`).
        **kwargs: forwarded to the builder (`width`, `input_shape`, `num_classes`, ...).

    Returns:
        A new, randomly initialised functional `keras.Model`.

    Raises:
        ValueError: for an unknown name, listing the valid ones.

    Example:
        >>> get("resnet8", width=8).name
        'resnet8'
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model name {name!r}; valid names are {names()}")
    return _REGISTRY[name](**kwargs)

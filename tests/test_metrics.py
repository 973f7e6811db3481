import keras
import pytest

import tfkdp
from tfkdp import metrics, models


def _single(layer, input_shape):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize(
    "layer, input_shape, expected",
    [
        # out 8×8 positions × 4 filters × (3·3 kernel · 2 in-channels)
        (keras.layers.Conv2D(4, 3, padding="same"), (8, 8, 2), 8 * 8 * 4 * 9 * 2),
        # stride 2, valid: out 3×3
        (keras.layers.Conv2D(4, 3, strides=2), (8, 8, 2), 3 * 3 * 4 * 9 * 2),
        # dilation 2, valid: effective kernel 5 → out 4×4
        (keras.layers.Conv2D(4, 3, dilation_rate=2), (8, 8, 2), 4 * 4 * 4 * 9 * 2),
        # groups=2: each filter sees 4/2 = 2 input channels
        (keras.layers.Conv2D(6, 3, padding="same", groups=2), (5, 5, 4), 5 * 5 * 6 * 9 * 2),
        (keras.layers.Conv1D(3, 5, padding="valid"), (10, 2), 6 * 3 * 5 * 2),
        # depth multiplier 2: 3·2 output channels, one 3×3 kernel each
        (keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (6, 6, 3), 36 * 6 * 9),
        # depthwise (6·6·3·9) + pointwise (6·6·3·5)
        (keras.layers.SeparableConv2D(5, 3, padding="same"), (6, 6, 3), 36 * 3 * 9 + 36 * 3 * 5),
        # transpose: each of 4×4 input positions scatters 3×3×5 from 2 channels
        (keras.layers.Conv2DTranspose(5, 3, strides=2), (4, 4, 2), 16 * 2 * 9 * 5),
        (keras.layers.Dense(7), (12,), 12 * 7),
        # Dense on a sequence applies per position
        (keras.layers.Dense(7), (3, 12), 3 * 12 * 7),
    ],
)
def test_count_macs_matches_hand_computation_per_layer_type(layer, input_shape, expected):
    assert metrics.count_macs(_single(layer, input_shape)) == expected


def test_count_macs_ignores_bn_activation_pooling():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, x)
    assert metrics.count_macs(model) == 8 * 8 * 4 * 9 * 2


def test_count_macs_nested_and_shared_layers_count_each_call():
    inner = models.resnet_cifar(8, width=4, input_shape=(8, 8, 1), num_classes=3)
    inputs = keras.Input((8, 8, 1))
    shared = keras.layers.Dense(5)
    y = keras.layers.Add()([inner(inputs), inner(inputs)])
    outer = keras.Model(inputs, keras.layers.Add()([shared(y), shared(y)]))
    assert metrics.count_macs(outer) == 2 * metrics.count_macs(inner) + 2 * 3 * 5


def test_resnet56_matches_published_figures():
    # He et al. / Torch-Pruning report ~125 M MACs and 0.85 M parameters for
    # resnet56 on 32×32×3; our projection shortcuts add 0.26 M MACs and 2.8 k
    # parameters, and BN moving statistics are counted, hence 1–2 % tolerance.
    model = models.resnet_cifar(56, input_shape=(32, 32, 3))
    assert tfkdp.count_macs(model) == pytest.approx(125.0e6, rel=0.01)
    assert tfkdp.count_params(model) == pytest.approx(0.85e6, rel=0.02)
    assert tfkdp.count_params(model) == model.count_params()


def test_count_params_trainable_only_excludes_bn_statistics():
    model = models.resnet_cifar(8, width=4, input_shape=(8, 8, 1))
    bn_stats = sum(
        2 * layer.moving_mean.shape[0]
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert metrics.count_params(model) - metrics.count_params(model, trainable_only=True) == bn_stats


def test_count_nonzero_params_counts_entries_that_are_not_exactly_zero():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(inputs))
    model.get_layer("d").kernel.assign([[1.0, 0.0], [0.0, -2.0], [0.5, 0.0]])
    model.get_layer("d").bias.assign([0.0, 3.0])
    assert metrics.count_params(model) == 8
    assert metrics.count_nonzero_params(model) == 4


def test_performance_efficiency_equals_a_hand_computation():
    # accuracy kept 0.88 / 0.92, cost kept 30 000 / 120 000 = 1/4
    assert metrics.performance_efficiency(0.88, 0.92, 30_000, 120_000) == pytest.approx(
        (0.88 / 0.92) * 4.0, rel=1e-12
    )
    # the reference itself scores exactly 1, whatever the unit of the cost
    assert metrics.performance_efficiency(0.9, 0.9, 3.2, 3.2) == 1.0
    assert metrics.performance_efficiency(0.9, 0.9, 3200, 3200) == 1.0
    # same accuracy at twice the cost: half as efficient
    assert metrics.performance_efficiency(0.5, 0.5, 2.0, 1.0) == 0.5


@pytest.mark.parametrize(
    "args, match",
    [
        ((0.9, 0.0, 1, 1), "reference_accuracy=0.0"),
        ((-0.1, 0.9, 1, 1), r"accuracy=-0\.1"),
        ((0.9, 0.9, 0, 1), "cost=0"),
        ((0.9, 0.9, 1, -5), "reference_cost=-5"),
        ((float("nan"), 0.9, 1, 1), "accuracy=nan"),
    ],
)
def test_performance_efficiency_rejects_bad_values_naming_them(args, match):
    with pytest.raises(ValueError, match=match):
        metrics.performance_efficiency(*args)

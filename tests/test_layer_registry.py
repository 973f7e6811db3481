"""One per-layer registry: a custom layer registered once is counted, planned,
masked, stripped, folded and merged correctly; masks are state."""

import keras
import numpy as np
import pytest

import tfkdp
from tfkdp import metrics, models
from tfkdp.pruning import (
    Producer,
    apply_plan,
    channel_groups,
    fold_batchnorm,
    hard_average,
    make_plan,
    merge_channels,
    plan_macs,
    register_layer,
    strip_channels,
)
from tfkdp.pruning.masks import WeightMask, enforce


@keras.saving.register_keras_serializable(package="tfkdp_tests")
class PlainConv(keras.layers.Layer):
    """A 3x3 'same' convolution written from keras.ops: not a subclass of any Keras conv."""

    def __init__(self, filters, use_bias=False, kernel_constraint=None, bias_constraint=None,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.filters = filters
        self.use_bias = use_bias
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(3, 3, input_shape[-1], self.filters), constraint=self.kernel_constraint,
            name="kernel",
        )  # fmt: skip
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                shape=(self.filters,), initializer="zeros", constraint=self.bias_constraint,
                name="bias",
            )  # fmt: skip

    def call(self, x):
        y = keras.ops.conv(x, self.kernel, padding="same")
        return y + self.bias if self.bias is not None else y

    def get_config(self):
        return dict(
            super().get_config(), filters=self.filters, use_bias=self.use_bias,
            kernel_constraint=keras.constraints.serialize(self.kernel_constraint),
            bias_constraint=keras.constraints.serialize(self.bias_constraint),
        )  # fmt: skip


register_layer(PlainConv, Producer("filters"))


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = PlainConv(16, name="pc1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = PlainConv(12, name="pc2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    rng = np.random.default_rng(seed)
    for bn in (model.get_layer("bn1"), model.get_layer("bn2")):
        size = bn.gamma.shape[0]
        bn.gamma.assign(rng.uniform(0.5, 1.5, size))
        bn.beta.assign(rng.normal(size=size))
        bn.moving_mean.assign(rng.normal(size=size))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, size))
    return model


def _x(n=4):
    return np.random.default_rng(1).normal(size=(n, 8, 8, 3)).astype("float32")


def _close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    # float32 sums in another order: 1e-5 of the output scale.
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, np.abs(a).max()))


def test_custom_conv_is_counted_with_the_conv_formula():
    model = _model()
    # 64 positions x 9 taps x cin x cout, plus the head's 12 x 3.
    assert metrics.count_macs(model) == 64 * 9 * 3 * 16 + 64 * 9 * 16 * 12 + 12 * 3


def test_custom_conv_groups_are_prunable_and_planned_to_budget():
    model = _model()
    groups = {g.id: g for g in channel_groups(model)}
    assert groups["pc1"].prunable and groups["pc2"].prunable
    plan = make_plan(model, target_macs_reduction=0.4)
    stripped = strip_channels(model, plan)
    assert plan_macs(model, plan) == metrics.count_macs(stripped)
    assert abs(metrics.count_macs(stripped) - 0.6 * metrics.count_macs(model)) <= 0.02 * 0.6 * (
        metrics.count_macs(model)
    )


def test_custom_conv_masked_equals_stripped():
    model = _model()
    plan = {"pc1": [0, 2, 5, 7, 9, 10, 11, 12, 13, 14, 15], "pc2": [1, 3, 4]}
    masked = apply_plan(model, plan)
    kernel = masked.get_layer("pc1").kernel.numpy()
    assert np.all(kernel[..., [1, 3, 4, 6, 8]] == 0)
    stripped = strip_channels(model, plan)
    assert stripped.get_layer("pc1").filters == 11 and stripped.get_layer("pc2").filters == 3
    _close(masked(_x()), stripped(_x()))


def test_custom_conv_folds_batchnorm_through_its_handler():
    model = _model()
    folded = fold_batchnorm(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert folded.get_layer("pc1").use_bias
    _close(model(_x(), training=False), folded(_x()))


def test_merge_channels_reproduces_the_hard_averaged_model():
    model = models.resnet_cifar(8, width=4, input_shape=(8, 8, 3), num_classes=3)
    x = _x()
    # A residual-coupled group (stem) and a block-internal one.
    clusters = {"stem_conv": [[0, 2], [1], [3]], "stage1_block1_conv1": [[3, 0, 1], [2]]}
    averaged = hard_average(model, clusters)
    merged = merge_channels(model, clusters)
    assert merged.get_layer("stage1_block1_conv1").filters == 2
    assert merged.get_layer("stem_conv").filters == 3
    _close(averaged(x, training=False), merged(x, training=False))
    # The averaging changed the function, so the check above is not vacuous.
    assert not np.allclose(averaged(x, training=False), model(x, training=False))


def test_merge_channels_rejects_clusters_that_are_not_a_partition():
    model = models.resnet_cifar(8, width=4, input_shape=(8, 8, 3), num_classes=3)
    with pytest.raises(ValueError, match="channel 1 is in clusters 0 and 1"):
        merge_channels(model, {"stage1_block1_conv1": [[0, 1], [1, 2]]})
    with pytest.raises(ValueError, match="unknown group id 'nope'"):
        merge_channels(model, {"nope": [[0]]})


def test_channel_mask_changes_during_training_without_rebuild_or_recompile():
    model = apply_plan(_model(), {"pc1": list(range(15))})
    mask = model.get_layer("pc1").kernel_constraint
    model.compile(optimizer="sgd", loss="mse")
    x, y = _x(8), np.random.default_rng(2).normal(size=(8, 3)).astype("float32")
    model.fit(x, y, epochs=1, verbose=0)
    train_function = model.train_function
    assert np.abs(model.get_layer("pc1").kernel.numpy()[..., 5]).max() > 0
    new_mask = np.ones(16, "float32")
    new_mask[[5, 15]] = 0.0
    mask.mask.assign(new_mask)
    model.fit(x, y, epochs=1, verbose=0)
    assert model.train_function is train_function  # not recompiled
    assert np.all(model.get_layer("pc1").kernel.numpy()[..., 5] == 0)
    assert tfkdp.plan_of(model).keep("pc1") == (0, 1, 2, 3, 4, *range(6, 15))


def test_masks_are_weights_of_the_keras_file_not_config(tmp_path):
    model = apply_plan(_model(), {"pc2": [0, 2, 4]})
    layer = model.get_layer("pc2")
    assert "keep" not in str(layer.get_config()["kernel_constraint"])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert tfkdp.plan_of(loaded).keep("pc2") == (0, 2, 4)
    assert metrics.count_params(loaded) == metrics.count_params(model) == metrics.count_params(_model())


def test_weight_mask_holds_element_zeros_through_training_and_save(tmp_path):
    inputs = keras.Input((4,))
    mask = WeightMask(shape=(4, 2))
    outputs = keras.layers.Dense(2, kernel_constraint=mask, name="d")(inputs)
    model = keras.Model(inputs, outputs)
    pattern = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], "float32")
    mask.mask.assign(pattern)
    assert enforce(model) == 1
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((8, 4), "float32"), np.ones((8, 2), "float32"), epochs=2, verbose=0)
    kernel = model.get_layer("d").kernel.numpy()
    assert np.all(kernel[pattern == 0] == 0) and np.all(kernel[pattern == 1] != 0)
    path = str(tmp_path / "w.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("d").kernel_constraint.mask.numpy(), pattern)

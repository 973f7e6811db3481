"""Channel dependency analysis (`tfkdp.graph`) and `PruningPlan`."""

import json

import keras
import numpy as np
import pytest
from keras import layers

from tfkdp import models
from tfkdp.pruning import (
    ChannelGroup,
    ParamRef,
    PassThrough,
    PruningPlan,
    channel_groups,
    channel_values,
    get_layer,
    get_weight,
    register_layer,
)


def _by_id(model):
    return {g.id: g for g in channel_groups(model)}


def _conv_chain():
    inputs = keras.Input((8, 8, 3), name="image")
    x = layers.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="c1_bn")(x)
    x = layers.ReLU(name="c1_relu")(x)
    x = layers.Conv2D(5, 3, name="c2")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def test_param_ref_indices_follow_documented_convention():
    # offset + k * stride + c * block + j, k < repeat, j < block.
    plain = ParamRef("l", "kernel", 3)
    np.testing.assert_array_equal(plain.indices(3), [[0], [1], [2]])
    flat = ParamRef("l", "kernel", 0, offset=2, repeat=2, stride=5)
    np.testing.assert_array_equal(flat.indices(3), [[2, 7], [3, 8], [4, 9]])
    blocked = ParamRef("l", "bias", 0, offset=4, block=2)
    np.testing.assert_array_equal(blocked.indices(2), [[4, 5], [6, 7]])
    default_stride = ParamRef("l", "kernel", 0, repeat=2)
    np.testing.assert_array_equal(default_stride.indices(2), [[0, 2], [1, 3]])


def test_channel_groups_conv_chain_lists_producer_and_consumer_slices():
    groups = _by_id(_conv_chain())
    assert list(groups) == ["image", "c1", "c2", "logits"]
    c1 = groups["c1"]
    assert c1.prunable and c1.reason == "" and c1.size == 6 and c1.producers == ("c1",)
    assert set(c1.out_params) == {
        ParamRef("c1", "kernel", 3), ParamRef("c1", "bias", 0), ParamRef("c1_bn", "gamma", 0),
        ParamRef("c1_bn", "beta", 0), ParamRef("c1_bn", "moving_mean", 0),
        ParamRef("c1_bn", "moving_variance", 0),
    }  # fmt: skip
    assert c1.in_params == (ParamRef("c2", "kernel", 2),)
    assert groups["c2"].in_params == (ParamRef("logits", "kernel", 0),)
    assert not groups["image"].prunable and "model input" in groups["image"].reason
    assert not groups["logits"].prunable and "model output 'logits'" in groups["logits"].reason


def test_channel_groups_residual_add_ties_stem_and_block_outputs():
    groups = _by_id(models.resnet_cifar(8, width=4, input_shape=(8, 8, 1)))
    stem = groups["stem_conv"]
    assert stem.producers == ("stem_conv", "stage1_block1_conv2")
    assert ParamRef("stage1_block1_conv2_bn", "gamma", 0) in stem.out_params
    # Read by the next block's first conv and by the projection shortcut.
    assert {r.layer for r in stem.in_params} == {
        "stage1_block1_conv1",
        "stage2_block1_conv1",
        "stage2_block1_proj",
    }
    assert "stage1_block1_conv2" not in groups


def test_channel_groups_projection_shortcut_joins_the_block_output():
    groups = _by_id(models.resnet_cifar(8, width=4, input_shape=(8, 8, 1)))
    stage2 = groups["stage2_block1_conv2"]
    assert stage2.producers == ("stage2_block1_conv2", "stage2_block1_proj")
    assert stage2.size == 8 and stage2.prunable
    assert ParamRef("stage2_block1_proj_bn", "beta", 0) in stage2.out_params


def test_channel_groups_concatenate_maps_offsets():
    inputs = keras.Input((6, 6, 2))
    a = layers.Conv2D(4, 1, name="a")(inputs)
    b = layers.Conv2D(3, 1, name="b")(inputs)
    x = layers.Concatenate(name="cat")([a, b])
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.Conv2D(2, 1, name="c")(x)
    groups = _by_id(keras.Model(inputs, layers.Flatten()(x)))
    assert ParamRef("c", "kernel", 2, offset=0) in groups["a"].in_params
    assert ParamRef("c", "kernel", 2, offset=4) in groups["b"].in_params
    assert ParamRef("bn", "gamma", 0, offset=4) in groups["b"].out_params
    np.testing.assert_array_equal(groups["b"].in_params[0].indices(3).ravel(), [4, 5, 6])


def test_channel_groups_depthwise_joins_input_group_and_multiplier_blocks():
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(4, 1, name="expand")(inputs)
    x = layers.DepthwiseConv2D(3, padding="same", name="dw1")(x)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw2")(x)
    x = layers.Conv2D(3, 1, name="project")(x)
    groups = _by_id(keras.Model(inputs, x))
    expand = groups["expand"]
    assert "dw1" not in groups and "dw2" not in groups
    assert ParamRef("dw1", "kernel", 2) in expand.out_params
    assert ParamRef("dw2", "kernel", 2) in expand.out_params
    assert ParamRef("dw2", "bias", 0, block=2) in expand.out_params
    assert expand.in_params == (ParamRef("project", "kernel", 2, block=2),)


def test_channel_groups_se_multiply_ties_excitation_to_features():
    inputs = keras.Input((6, 6, 3))
    x = layers.Conv2D(8, 3, padding="same", name="features")(inputs)
    s = layers.GlobalAveragePooling2D(name="squeeze")(x)
    s = layers.Dense(2, activation="relu", name="reduce")(s)
    s = layers.Dense(8, activation="sigmoid", name="excite")(s)
    s = layers.Reshape((1, 1, 8), name="se_reshape")(s)
    x = layers.Multiply(name="se_mul")([x, s])
    x = layers.Conv2D(4, 1, name="next")(x)
    groups = _by_id(keras.Model(inputs, x))
    features = groups["features"]
    assert features.producers == ("features", "excite") and features.prunable
    assert ParamRef("reduce", "kernel", 0) in features.in_params
    assert groups["reduce"].prunable and groups["reduce"].size == 2


def test_channel_groups_flatten_dense_rows_repeat_over_positions():
    model = models.vgg_cifar(11, width_multiplier=1 / 16, input_shape=(32, 32, 1))
    groups = _by_id(model)
    last = groups["block5_conv8"]
    (ref,) = last.in_params
    # 32 px / 2**5 pools = 1×1; use a model where Flatten sees 2×2 positions.
    assert ref == ParamRef("logits", "kernel", 0)
    inputs = keras.Input((4, 4, 1))
    x = layers.Conv2D(3, 3, padding="same", name="c")(inputs)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flat")(x)
    groups = _by_id(keras.Model(inputs, layers.Dense(2, name="fc")(x)))
    (ref,) = groups["c"].in_params
    assert ref == ParamRef("fc", "kernel", 0, repeat=4, stride=3)
    # Channel c owns rows c, c+3, c+6, c+9 of the 12-row kernel.
    np.testing.assert_array_equal(ref.indices(3)[1], [1, 4, 7, 10])


def test_channel_groups_nested_models_use_slash_paths():
    inner_in = keras.Input((6, 6, 4))
    y = layers.Conv2D(4, 3, padding="same", name="conv")(inner_in)
    y = layers.BatchNormalization(name="bn")(y)
    inner = keras.Model(inner_in, layers.Add(name="add")([inner_in, y]), name="block")
    seq = keras.Sequential(
        [keras.Input((6, 6, 4)), layers.Conv2D(5, 1, name="s1"), layers.Conv2D(4, 1, name="s2")],
        name="seq",
    )
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(4, 1, name="stem")(inputs)
    x = seq(inner(x))
    model = keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    groups = _by_id(model)
    assert groups["stem"].producers == ("stem", "block/conv")
    assert ParamRef("block/bn", "gamma", 0) in groups["stem"].out_params
    assert ParamRef("seq/s1", "kernel", 2) in groups["stem"].in_params
    assert groups["seq/s1"].prunable and groups["seq/s1"].size == 5
    assert get_layer(model, "block/conv").name == "conv"
    assert get_weight(model, ParamRef("seq/s2", "kernel", 3)).shape == (1, 1, 5, 4)


def test_channel_groups_shared_layer_ties_its_inputs():
    inputs = keras.Input((6, 6, 2))
    a = layers.Conv2D(3, 1, name="a")(inputs)
    b = layers.Conv2D(3, 1, name="b")(inputs)
    shared = layers.Conv2D(4, 1, name="shared")
    x = layers.Concatenate(axis=1, name="stack")([shared(a), shared(b)])
    groups = channel_groups(keras.Model(inputs, layers.Conv2D(2, 1, name="head")(x)))
    tied = [g for g in groups if "a" in g.producers]
    assert len(tied) == 1 and set(tied[0].producers) == {"a", "b"} and tied[0].prunable
    assert {r.layer for r in tied[0].in_params} == {"shared"}
    assert [g.prunable for g in groups if g.id == "shared"] == [True]


def test_channel_groups_keras_ops_arithmetic_couples_channels():
    inputs = keras.Input((6, 6, 2))
    a = layers.Conv2D(3, 1, name="a")(inputs)
    b = layers.Conv2D(3, 1, name="b")(inputs)
    x = (a + b) * 0.5
    groups = _by_id(keras.Model(inputs, layers.Conv2D(2, 1, name="head")(x)))
    assert groups["a"].producers == ("a", "b") and groups["a"].prunable


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda x: layers.LayerNormalization(name="op")(x), "normalises over the channel axis"),
        (lambda x: layers.Softmax(name="op")(x), "normalises over the channel axis"),
        (lambda x: layers.Reshape((4, 36), name="op")(x), "moves the channel axis"),
        (lambda x: layers.Lambda(lambda t: t, name="op")(x), "unregistered class"),
        (lambda x: layers.Activation("softmax", name="op")(x), "not known to act element"),
        (lambda x: layers.GroupNormalization(2, name="op")(x), "groups of channels"),
    ],
    ids=["layer_norm", "softmax", "reshape", "lambda", "softmax_activation", "group_norm"],
)
def test_channel_groups_marks_channel_mixing_layers_unprunable(make, expected):
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(4, 1, name="c")(inputs)
    x = make(x)
    x = layers.Conv2D(3, 1, name="after")(layers.Reshape((6, 6, 4))(x) if x.shape[-1] != 4 else x)
    x = layers.GlobalAveragePooling2D()(x)
    groups = _by_id(keras.Model(inputs, layers.Dense(2)(x)))
    assert not groups["c"].prunable
    assert expected in groups["c"].reason and "'op'" in groups["c"].reason
    assert groups["after"].prunable


def test_channel_groups_unknown_layer_reason_names_class_and_registration_fixes_it():
    class TimesTwo(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    def build():
        inputs = keras.Input((6, 6, 2))
        x = layers.Conv2D(4, 1, name="c")(inputs)
        x = TimesTwo(name="double")(x)
        return keras.Model(inputs, layers.Conv2D(3, 1, name="after")(x))

    group = _by_id(build())["c"]
    assert not group.prunable
    assert "'double'" in group.reason and "TimesTwo" in group.reason
    register_layer(TimesTwo, PassThrough())
    assert _by_id(build())["c"].prunable


def test_channel_groups_fused_activation_sigmoid_prunable_softmax_not():
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(4, 1, activation="sigmoid", name="gate")(inputs)
    y = layers.Conv2D(4, 1, activation="softmax", name="soft")(x)
    groups = _by_id(keras.Model(inputs, layers.Conv2D(2, 1, name="out")(y)))
    assert groups["gate"].prunable
    assert not groups["soft"].prunable and "softmax" in groups["soft"].reason


def test_channel_groups_channels_first_and_grouped_conv_are_unprunable():
    inputs = keras.Input((6, 6, 4))
    x = layers.Conv2D(4, 1, groups=2, name="grouped")(inputs)
    x = layers.Conv2D(4, 1, name="plain")(x)
    groups = _by_id(keras.Model(inputs, layers.Conv2D(2, 1, name="out")(x)))
    assert not groups["grouped"].prunable and "groups=2" in groups["grouped"].reason
    assert groups["plain"].prunable


def test_channel_groups_concat_tied_to_single_group_is_unprunable():
    inputs = keras.Input((6, 6, 2))
    a = layers.Conv2D(2, 1, name="a")(inputs)
    b = layers.Conv2D(2, 1, name="b")(inputs)
    c = layers.Conv2D(4, 1, name="c")(inputs)
    x = layers.Add(name="mix")([layers.Concatenate(name="cat")([a, b]), c])
    groups = _by_id(keras.Model(inputs, layers.Conv2D(2, 1, name="out")(x)))
    for gid in ("a", "b", "c"):
        assert not groups[gid].prunable and "'mix'" in groups[gid].reason


def test_channel_groups_is_deterministic_across_rebuilds():
    first = channel_groups(models.mobilenet_v2_cifar(0.25, input_shape=(8, 8, 3)))
    second = channel_groups(models.mobilenet_v2_cifar(0.25, input_shape=(8, 8, 3)))
    assert first == second
    assert all(isinstance(g, ChannelGroup) for g in first)


def test_channel_groups_rejects_subclassed_models():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="functional"):
        channel_groups(Net())


def test_get_layer_unknown_path_names_available_layers():
    with pytest.raises(ValueError, match="'c3'.*available"):
        get_layer(_conv_chain(), "c3")


def test_channel_values_rows_are_the_channel_filters():
    model = _conv_chain()
    group = _by_id(model)["c1"]
    values = channel_values(model, ParamRef("c1", "kernel", 3), group.size)
    kernel = model.get_layer("c1").kernel.numpy()
    assert values.shape == (6, 3 * 3 * 3)
    np.testing.assert_allclose(values[2], kernel[..., 2].ravel())


# -- PruningPlan --------------------------------------------------------------


def test_pruning_plan_normalises_and_round_trips_json():
    plan = PruningPlan({"c1": np.array([4, 0, 2]), "c2": (1,)})
    assert plan.keep("c1") == (0, 2, 4) and plan["c2"] == (1,)
    assert plan.keep("absent", size=3) == (0, 1, 2)
    text = plan.to_json()
    assert json.loads(text)["keep"] == {"c1": [0, 2, 4], "c2": [1]}
    assert PruningPlan.from_json(text) == plan
    assert PruningPlan.from_json('{"c1": [0, 2, 4], "c2": [1]}') == plan
    assert plan == {"c1": [2, 0, 4], "c2": [1]}
    assert plan != PruningPlan({"c1": [0, 2]})
    with pytest.raises(KeyError):
        plan.keep("absent")


@pytest.mark.parametrize(
    "keep, message",
    [
        ({"c1": []}, "keeps no channel"),
        ({"c1": [0, 1, 1]}, "duplicates: \\[1\\]"),
        ({"c1": [-1, 2]}, ">= 0"),
        ({"c1": [0.5]}, "integers"),
        ({"": [0]}, "non-empty strings"),
        ({"c1": "01"}, "iterable of ints"),
    ],
)
def test_pruning_plan_rejects_malformed_keep(keep, message):
    with pytest.raises(ValueError, match=message):
        PruningPlan(keep)


@pytest.mark.parametrize(
    "keep, message",
    [
        ({"nope": [0]}, "Unknown group id 'nope'.*'c1'"),
        ({"c1": [0, 6]}, "'c1' has 6 channels; keep index 6 is out of range"),
        ({"logits": [0]}, "'logits' is not prunable: reaches model output"),
        ({"image": [0]}, "'image' is not prunable: model input"),
    ],
)
def test_pruning_plan_validate_names_the_offending_group(keep, message):
    model = _conv_chain()
    with pytest.raises(ValueError, match=message):
        PruningPlan(keep).validate(model)
    PruningPlan({"c1": [0, 5]}).validate(channel_groups(model))


def test_pruning_plan_from_json_rejects_garbage():
    with pytest.raises(ValueError, match="Not a JSON"):
        PruningPlan.from_json("{not json")
    with pytest.raises(ValueError, match="version"):
        PruningPlan.from_json('{"format": "tfkdp.PruningPlan", "version": 99, "keep": {}}')

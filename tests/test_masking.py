"""Channel masks (`tfkdp.masking`): zeros through the whole group, kept through training."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkdp import models
from tfkdp.pruning import ChannelMask, PruningPlan, apply_plan, plan_of
from tfkdp.pruning.masks import mask_axes, unwrap_mask

# Stem group of resnet8 (stem conv + stage1 conv2, tied by the residual add)
# and the first conv of stage 2.
PLAN = PruningPlan({"stem_conv": [0, 2], "stage2_block1_conv1": [1, 2, 3, 5]})


def _resnet8():
    return models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)


def _compile(model, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    return model


def _assert_plan_zeros(model):
    """Every weight slice of the pruned channels of PLAN is exactly zero."""
    stem_pruned, stage2_pruned = [1, 3], [0, 4, 6, 7]
    for name in ("stem_conv", "stage1_block1_conv2"):
        kernel = model.get_layer(name).kernel.numpy()
        assert np.all(kernel[..., stem_pruned] == 0) and np.any(kernel[..., [0, 2]] != 0)
        bn = model.get_layer(f"{name}_bn")
        assert np.all(bn.gamma.numpy()[stem_pruned] == 0)
        assert np.all(bn.beta.numpy()[stem_pruned] == 0)
    # Consumers' input slices.
    for name in ("stage1_block1_conv1", "stage2_block1_conv1", "stage2_block1_proj"):
        kernel = model.get_layer(name).kernel.numpy()
        assert np.all(kernel[:, :, stem_pruned, :] == 0)
    kernel = model.get_layer("stage2_block1_conv1").kernel.numpy()
    assert np.all(kernel[..., stage2_pruned] == 0)
    assert np.all(model.get_layer("stage2_block1_conv2").kernel.numpy()[:, :, stage2_pruned] == 0)


def test_channel_mask_zeroes_entries_outside_keep_on_its_axis():
    mask = ChannelMask(size=3, axis=1, keep=[2, 0])
    out = keras.ops.convert_to_numpy(mask(keras.ops.ones((2, 3, 4))))
    np.testing.assert_array_equal(out[:, 1], 0.0)
    np.testing.assert_array_equal(out[:, [0, 2]], 1.0)
    assert mask.keep == (0, 2)


def test_channel_mask_config_round_trips_with_inner_constraint():
    mask = ChannelMask(2, -1, keep=[1], constraint=ChannelMask(3, 0, keep=[0, 2], constraint=keras.constraints.NonNeg()))
    restored = keras.constraints.deserialize(keras.constraints.serialize(mask))
    assert isinstance(restored, ChannelMask) and restored.get_config() == mask.get_config()
    # Masks are state: the config holds sizes and axes, the values travel with the
    # weights (a .keras file, a checkpoint), as they do here.
    assert "keep" not in json.dumps(keras.constraints.serialize(mask))
    restored.mask.assign(mask.mask)
    restored.constraint.mask.assign(mask.constraint.mask)
    assert isinstance(unwrap_mask(restored), keras.constraints.NonNeg)
    axes = mask_axes(restored)
    np.testing.assert_array_equal(axes[-1], [False, True])
    np.testing.assert_array_equal(axes[0], [True, False, True])
    value = np.full((3, 2), -1.0, dtype="float32")
    value[0, 1] = 5.0
    out = keras.ops.convert_to_numpy(restored(value))
    np.testing.assert_array_equal(out, [[0, 5], [0, 0], [0, 0]])


def test_channel_mask_rejects_bad_indices():
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        ChannelMask(3, 0, keep=[0, 3])
    with pytest.raises(ValueError, match="size must be positive"):
        ChannelMask(0, 0, keep=[])


def test_apply_plan_zeroes_every_slice_of_the_group_and_keeps_names():
    model = _resnet8()
    masked = apply_plan(model, PLAN)
    _assert_plan_zeros(masked)
    assert [layer.name for layer in masked.layers] == [layer.name for layer in model.layers]
    assert [type(layer) for layer in masked.layers] == [type(layer) for layer in model.layers]
    assert masked.name == model.name
    # Kept weights are copied unchanged.
    np.testing.assert_array_equal(
        masked.get_layer("stage3_block1_conv1").kernel.numpy(),
        model.get_layer("stage3_block1_conv1").kernel.numpy(),
    )


def test_apply_plan_pruned_activations_are_exactly_zero():
    model = _resnet8()
    masked = apply_plan(model, PLAN)
    probe = keras.Model(
        masked.inputs,
        [masked.get_layer(n).output for n in ("stem_conv_relu", "stage1_block1_out")],
    )
    x = np.random.default_rng(0).normal(size=(4, 12, 12, 1)).astype("float32")
    for activation in probe(x):
        activation = keras.ops.convert_to_numpy(activation)
        assert np.all(activation[..., [1, 3]] == 0) and np.any(activation[..., [0, 2]] != 0)


def test_apply_plan_leaves_input_model_unchanged():
    model = _resnet8()
    before = [w.numpy().copy() for w in model.weights]
    apply_plan(model, PLAN)
    for old, now in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, now.numpy())
    assert model.get_layer("stem_conv").kernel.constraint is None
    assert all(len(layer._inbound_nodes) == 1 for layer in model.layers)


def test_masks_survive_fit_with_sgd(tiny_images):
    x, y = tiny_images
    masked = _compile(apply_plan(_resnet8(), PLAN), keras.optimizers.SGD(0.5))
    masked.fit(x, y, batch_size=16, epochs=1, verbose=0)
    _assert_plan_zeros(masked)


def test_masks_survive_custom_apply_gradients_loop(tiny_images):
    # The ADMM/KDP distiller updates weights through optimizer.apply_gradients.
    x, y = tiny_images
    masked = apply_plan(_resnet8(), PLAN)
    optimizer = keras.optimizers.Adam(0.1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, masked(x, training=True))
        grads = tape.gradient(loss, masked.trainable_variables)
        optimizer.apply_gradients(zip(grads, masked.trainable_variables, strict=True))
    _assert_plan_zeros(masked)


def test_masked_model_keras_round_trip_keeps_masks_through_training(tmp_path, tiny_images):
    x, y = tiny_images
    masked = apply_plan(_resnet8(), PLAN)
    path = os.path.join(tmp_path, "masked.keras")
    masked.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x[:4]), masked(x[:4]), rtol=0, atol=0)
    assert plan_of(loaded) == PLAN
    _compile(loaded, keras.optimizers.SGD(0.5)).fit(x, y, batch_size=32, epochs=1, verbose=0)
    _assert_plan_zeros(loaded)


def test_apply_plan_composes_with_user_constraint(tiny_images):
    x, y = tiny_images
    inputs = keras.Input((12, 12, 1))
    h = keras.layers.Conv2D(4, 3, kernel_constraint=keras.constraints.NonNeg(), name="c1")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(h))
    masked = apply_plan(model, {"c1": [0, 3]})
    constraint = masked.get_layer("c1").kernel.constraint
    assert isinstance(constraint, ChannelMask)
    assert isinstance(unwrap_mask(constraint), keras.constraints.NonNeg)
    _compile(masked, keras.optimizers.SGD(1.0)).fit(x, y, batch_size=16, epochs=1, verbose=0)
    kernel = masked.get_layer("c1").kernel.numpy()
    assert np.all(kernel >= 0)
    assert np.all(kernel[..., [1, 2]] == 0)
    assert np.all(masked.get_layer("out").kernel.numpy()[[1, 2]] == 0)


def test_apply_plan_on_masked_model_replaces_masks():
    masked = apply_plan(_resnet8(), PLAN)
    replanned = apply_plan(masked, {"stage3_block1_conv1": list(range(8))})
    assert plan_of(replanned) == PruningPlan({"stage3_block1_conv1": list(range(8))})
    # Channels masked before stay zero in value but are no longer constrained.
    assert replanned.get_layer("stem_conv").kernel.constraint is None
    assert plan_of(apply_plan(masked, {})) == PruningPlan({})


def test_plan_of_unmasked_model_is_empty():
    assert plan_of(_resnet8()) == PruningPlan({})


def test_apply_plan_rejects_invalid_plan():
    with pytest.raises(ValueError, match="Unknown group id 'nope'"):
        apply_plan(_resnet8(), {"nope": [0]})
    with pytest.raises(ValueError, match="out of range"):
        apply_plan(_resnet8(), {"stem_conv": [0, 4]})

"""Channel importance criteria: hand-computed scores on small models."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkdp import criteria, models
from tfkdp.pruning import channel_groups, channel_values


def _tiny_resnet():
    return models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)


def _groups(model):
    return {g.id: g for g in channel_groups(model)}


def _conv_net(use_bn):
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(5, 3, padding="same", use_bias=not use_bn, name="conv")(inputs)
    if use_bn:
        x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="relu")(x)
    x = keras.layers.Conv2D(4, 1, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def test_l1_and_l2_average_over_every_producer_kernel_of_a_residual_group():
    model = _tiny_resnet()
    group = _groups(model)["stem_conv"]
    kernels = [r for r in group.out_params if r.attr == "kernel"]
    # The residual group of stage 1 is produced by the stem and the block's second conv.
    assert {r.layer for r in kernels} == {"stem_conv", "stage1_block1_conv2"}
    mats = [channel_values(model, r, group.size) for r in kernels]
    want_l1 = np.mean([np.abs(m).mean(axis=1) for m in mats], axis=0)
    want_l2 = np.mean([np.sqrt((m**2).mean(axis=1)) for m in mats], axis=0)
    np.testing.assert_allclose(criteria.get("l1")(model, [group])[group.id], want_l1, rtol=1e-6)
    np.testing.assert_allclose(criteria.get("l2")(model, [group])[group.id], want_l2, rtol=1e-6)


def test_l1_ranks_a_scaled_filter_first():
    model = _conv_net(use_bn=True)
    group = _groups(model)["conv"]
    kernel = model.get_layer("conv").kernel
    kernel.assign(kernel.numpy() * np.array([1, 1, 5, 1, 0.1], "float32"))
    scores = criteria.get("l1")(model, [group])["conv"]
    assert int(np.argmax(scores)) == 2 and int(np.argmin(scores)) == 4


def test_bn_gamma_is_abs_gamma_and_falls_back_to_l1_without_bn():
    model = _conv_net(use_bn=True)
    gamma = np.array([0.5, -2.0, 0.1, 1.0, -0.3], "float32")
    model.get_layer("bn").gamma.assign(gamma)
    np.testing.assert_allclose(
        criteria.get("bn_gamma")(model, [_groups(model)["conv"]])["conv"], np.abs(gamma)
    )
    plain = _conv_net(use_bn=False)
    group = _groups(plain)["conv"]
    np.testing.assert_allclose(
        criteria.get("bn_gamma")(plain, [group])["conv"], criteria.get("l1")(plain, [group])["conv"]
    )


def test_fpgm_matches_brute_force_distance_sum():
    model = _tiny_resnet()
    group = _groups(model)["stem_conv"]
    mats = [channel_values(model, r, group.size) for r in group.out_params if r.attr == "kernel"]
    rows = np.concatenate(mats, axis=1)
    want = np.array([sum(np.linalg.norm(rows[i] - rows[j]) for j in range(len(rows))) for i in range(len(rows))])
    np.testing.assert_allclose(criteria.get("fpgm")(model, [group])["stem_conv"], want, rtol=1e-6)


def test_fpgm_scores_a_duplicated_median_filter_lowest():
    rows = np.array([[0.0, 0.0], [0.0, 0.1], [5.0, 0.0], [0.0, 5.0], [-5.0, 0.0]])
    scores = criteria.fpgm_scores([rows])
    assert set(np.argsort(scores)[:2]) == {0, 1}


def test_taylor_equals_abs_activation_times_gradient_averaged_over_batches():
    model = _conv_net(use_bn=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=12).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    got = criteria.get("taylor", num_batches=3)(model, [_groups(model)["conv"]], data=ds)["conv"]

    probe = keras.Model(model.inputs, [model.output, model.get_layer("conv").output])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    want = np.zeros(5)
    for xb, yb in ds:
        with tf.GradientTape() as tape:
            logits, act = probe(xb, training=False)
            tape.watch(act)
            # Recompute the head from `act` so the gradient w.r.t. it is defined.
            h = model.get_layer("relu")(act)
            h = model.get_layer("conv2")(h)
            out = model.get_layer("logits")(model.get_layer("pool")(h))
            loss = loss_fn(yb, out)
        grad = tape.gradient(loss, act).numpy()
        want += np.abs(np.sum(act.numpy() * grad, axis=(0, 1, 2)))
    np.testing.assert_allclose(got, want / 3, rtol=1e-4, atol=1e-7)


def _brute_force_hessian(model, x, layer="conv"):
    """Mean over examples of Σ_o (∂f_o/∂w)², summed per output channel, × ‖W_c‖² / n_c."""
    kernel = model.get_layer(layer).kernel
    trace = np.zeros(kernel.shape)
    for xi in x:
        with tf.GradientTape() as tape:
            out = model(xi[None], training=False)
        jac = tape.jacobian(out, kernel.value).numpy()  # (1, outputs, *kernel.shape)
        trace += np.square(jac).sum(axis=(0, 1))
    trace /= len(x)
    w = kernel.numpy()
    return trace.sum(axis=(0, 1, 2)) * np.square(w).sum(axis=(0, 1, 2)) / np.prod(w.shape[:3])


def _one_output_net():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(5, 3, padding="same", name="conv")(inputs)
    x = keras.layers.Activation("tanh", name="act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(1, name="logits")(x))


def test_hessian_is_exact_for_one_output_and_batches_of_one():
    # With one output per batch, a Rademacher probe v = ±1 gives (v·∂f/∂w)² = (∂f/∂w)²
    # exactly, so the Hutchinson estimate equals the brute-force Jacobian trace.
    model = _one_output_net()
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 2)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(3, "int32"))).batch(1)
    got = criteria.get("hessian", num_batches=3, num_probes=2)(
        model, [_groups(model)["conv"]], data=ds
    )["conv"]
    np.testing.assert_allclose(got, _brute_force_hessian(model, x), rtol=1e-5)


def test_hessian_hutchinson_estimate_converges_to_the_jacobian_trace():
    model = _conv_net(use_bn=True)
    x = np.random.default_rng(1).normal(size=(4, 6, 6, 2)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(4, "int32"))).batch(1)
    crit = criteria.get("hessian", num_batches=4, num_probes=300, seed=3)
    got = crit(model, [_groups(model)["conv"]], data=ds)["conv"]
    want = _brute_force_hessian(model, x)
    # 3 outputs: the Rademacher cross terms average out as 1/sqrt(1200 probes) ≈ 3 %;
    # 15 % leaves room for a few standard deviations.
    np.testing.assert_allclose(got, want, rtol=0.15)
    # the same seed and data give the same scores
    np.testing.assert_array_equal(crit(model, [_groups(model)["conv"]], data=ds)["conv"], got)


def test_hessian_needs_data_and_validates_its_numbers():
    model = _conv_net(use_bn=True)
    with pytest.raises(ValueError, match="data=None"):
        criteria.get("hessian")(model, [_groups(model)["conv"]])
    with pytest.raises(ValueError, match="num_probes=0"):
        criteria.get("hessian", num_probes=0)


def test_taylor_needs_data():
    model = _conv_net(use_bn=True)
    with pytest.raises(ValueError, match="data=None"):
        criteria.get("taylor")(model, [_groups(model)["conv"]])


def test_random_is_seeded_and_independent_of_group_order():
    model = _tiny_resnet()
    groups = [g for g in channel_groups(model) if g.prunable]
    a = criteria.get("random", seed=3)(model, groups)
    b = criteria.get("random", seed=3)(model, groups[::-1])
    c = criteria.get("random", seed=4)(model, groups)
    for gid in a:
        np.testing.assert_array_equal(a[gid], b[gid])
    assert any(not np.array_equal(a[g], c[g]) for g in a)


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match=r"'l3'.*\['bn_gamma', 'fpgm', 'hessian', 'l1', 'l2', 'random', 'taylor'\]"
    ):
        criteria.get("l3")


@pytest.mark.parametrize("name", criteria.names())
def test_criterion_config_round_trip(name):
    kwargs = {"seed": 9} if name == "random" else {}
    crit = criteria.get(name, **kwargs)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(crit))
    assert type(restored) is type(crit)
    assert restored.get_config() == crit.get_config()


def test_every_criterion_scores_every_prunable_group_of_a_zoo_model():
    model = models.mobilenet_v2_cifar(0.25, input_shape=(8, 8, 3), num_classes=3)
    groups = [g for g in channel_groups(model) if g.prunable]
    rng = np.random.default_rng(0)
    ds = tf.data.Dataset.from_tensor_slices(
        (rng.uniform(size=(4, 8, 8, 3)).astype("float32"), np.arange(4) % 3)
    ).batch(2)
    for name in criteria.names():
        scores = criteria.get(name)(model, groups, data=ds)
        assert sorted(scores) == sorted(g.id for g in groups)
        for g in groups:
            assert scores[g.id].shape == (g.size,) and np.all(np.isfinite(scores[g.id]))
            assert np.all(scores[g.id] >= 0)


@pytest.mark.parametrize("name", ["taylor", "hessian"])
def test_data_criteria_score_a_model_held_by_a_strategy_as_its_plain_copy(name):
    """Under `strategy.scope()` eager gradients of mirrored variables are refused: scored on a copy."""
    from tfkdp import runtime

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 12, 12, 1)).astype("float32")
    y = (np.arange(16) % 3).astype("int32")
    keras.utils.set_random_seed(0)
    plain = _tiny_resnet()
    strategy = runtime.mirrored_strategy()
    with strategy.scope():
        held = keras.models.clone_model(plain)
        held.set_weights(plain.get_weights())
        criterion = criteria.get(name, batch_size=8) if name == "taylor" else criteria.get(name)
        scores = criterion(held, [g for g in channel_groups(held) if g.prunable], (x, y))
    want = criterion(plain, [g for g in channel_groups(plain) if g.prunable], (x, y))
    assert scores.keys() == want.keys()
    for gid in want:
        np.testing.assert_allclose(scores[gid], want[gid], rtol=1e-5, atol=1e-7)

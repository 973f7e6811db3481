"""Channel stripping and batch-norm folding (`tfkdp.surgery`).

Every check compares outputs: the stripped model must compute what the
masked model computes. Tolerance: 1e-5 of the output scale (max |output|);
float32 sums over a few hundred terms drift by ~1e-7 relative, so 1e-5
leaves room without hiding a wrong slice (a wrong slice moves outputs by
O(1) relative).
"""

import keras
import numpy as np
import pytest
from keras import layers

from tfkdp import metrics, models
from tfkdp.pruning import (
    ChannelMask,
    PruningPlan,
    apply_plan,
    channel_groups,
    fold_batchnorm,
    hard_average,
    merge_channels,
    plan_macs,
    plan_params,
    strip_channels,
)

RTOL = 1e-5


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _perturb_batchnorm(model, rng):
    """Non-trivial batch-norm statistics so that slicing mistakes show."""
    for layer in _all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, size).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, size).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, size).astype("float32"))
            if layer.center:
                layer.beta.assign(rng.normal(0, 0.2, size).astype("float32"))


def _random_plan(model, rng, fraction=0.5):
    keep = {}
    for group in channel_groups(model):
        if group.prunable and group.size > 1:
            count = max(1, int(round(group.size * fraction)))
            keep[group.id] = rng.choice(group.size, count, replace=False)
    return PruningPlan(keep)


def _inputs(model, rng, batch=2):
    return rng.normal(size=(batch,) + tuple(model.input_shape[1:])).astype("float32")


def _assert_close(expected, actual):
    expected, actual = keras.ops.convert_to_numpy(expected), keras.ops.convert_to_numpy(actual)
    scale = max(float(np.abs(expected).max()), 1e-12)
    assert expected.shape == actual.shape
    assert float(np.abs(expected - actual).max()) <= RTOL * scale


def _check_strip(model, seed=0, fraction=0.5):
    """Masked == stripped, MACs/params as predicted; returns (plan, stripped)."""
    rng = np.random.default_rng(seed)
    _perturb_batchnorm(model, rng)
    plan = _random_plan(model, rng, fraction)
    assert len(plan) > 0
    x = _inputs(model, rng)
    masked = apply_plan(model, plan)
    stripped = strip_channels(model, plan)
    _assert_close(masked(x), stripped(x))
    assert plan_macs(model, plan) == metrics.count_macs(stripped)
    assert plan_params(model, plan) == metrics.count_params(stripped)
    assert metrics.count_macs(stripped) < metrics.count_macs(model)
    assert metrics.count_params(stripped) < metrics.count_params(model)
    return plan, stripped


# -- one model per coupling kind ---------------------------------------------


def _conv_chain():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="c1_bn")(x)
    x = layers.ReLU(name="c1_relu")(x)
    x = layers.Conv2D(6, 3, strides=2, name="c2", activation="relu")(x)
    x = layers.Dropout(0.5, name="drop")(x)
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _residual_add():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    for i in range(2):
        y = layers.Conv2D(4, 3, padding="same", name=f"b{i}_c1")(x)
        y = layers.BatchNormalization(name=f"b{i}_bn1")(y)
        y = layers.Activation("relu", name=f"b{i}_relu")(y)
        y = layers.Conv2D(6, 3, padding="same", name=f"b{i}_c2")(y)
        y = layers.BatchNormalization(name=f"b{i}_bn2")(y)
        merge = [layers.Add, layers.Subtract][i]
        x = merge(name=f"b{i}_merge")([x, y])
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _projection_shortcut():
    return models.resnet_cifar(8, width=4, input_shape=(8, 8, 1), num_classes=3)


def _concat():
    inputs = keras.Input((8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", name="a")(inputs)
    b = layers.Conv2D(6, 1, name="b", activation="relu")(inputs)
    x = layers.Concatenate(name="cat")([a, b, a])
    x = layers.BatchNormalization(name="cat_bn")(x)
    x = layers.Activation("relu", name="cat_relu")(x)
    y = layers.Conv2D(5, 3, padding="same", name="c")(x)
    x = layers.Concatenate(name="cat2")([x, y])
    x = layers.AveragePooling2D(4, name="pool")(x)
    x = layers.Flatten(name="flat")(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _depthwise():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 1, name="expand")(inputs)
    x = layers.BatchNormalization(name="expand_bn")(x)
    x = layers.ReLU(6.0, name="expand_relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="dw1")(x)
    x = layers.BatchNormalization(name="dw1_bn")(x)
    x = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw2")(x)
    x = layers.BatchNormalization(name="dw2_bn")(x)
    x = layers.SeparableConv2D(5, 3, depth_multiplier=2, padding="same", name="sep")(x)
    x = layers.Conv2D(4, 1, name="project")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _se_multiply():
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="features", activation="swish")(inputs)
    s = layers.GlobalAveragePooling2D(name="squeeze")(x)
    s = layers.Dense(3, activation="relu", name="reduce")(s)
    s = layers.Dense(8, activation="sigmoid", name="excite")(s)
    s = layers.Reshape((1, 1, 8), name="se_reshape")(s)
    x = layers.Multiply(name="se_mul")([x, s])
    # Convolutional SE with keepdims pooling.
    t = layers.GlobalAveragePooling2D(keepdims=True, name="squeeze2")(x)
    t = layers.Conv2D(2, 1, activation="relu", name="reduce2")(t)
    t = layers.Conv2D(8, 1, activation="hard_sigmoid", name="excite2")(t)
    x = layers.Multiply(name="se_mul2")([t, x])
    x = layers.Conv2D(4, 1, name="project")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _flatten_dense():
    inputs = keras.Input((9, 9, 2))
    x = layers.ZeroPadding2D(1, name="pad")(inputs)
    x = layers.Conv2D(5, 3, name="c1")(x)
    x = layers.BatchNormalization(name="c1_bn")(x)
    x = layers.Cropping2D(((1, 0), (0, 1)), name="crop")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flat")(x)
    x = layers.Dense(6, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.1)(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _nested():
    inner_in = keras.Input((8, 8, 6))
    y = layers.Conv2D(6, 3, padding="same", name="conv")(inner_in)
    y = layers.BatchNormalization(name="bn")(y)
    block = keras.Model(inner_in, layers.Add(name="add")([inner_in, y]), name="block")
    seq = keras.Sequential(
        [keras.Input((8, 8, 6)), layers.Conv2D(7, 1, name="s1"), layers.ELU(name="elu"),
         layers.Conv2D(6, 1, name="s2")],
        name="seq",
    )  # fmt: skip
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(6, 3, padding="same", name="stem")(inputs)
    x = block(x)
    x = seq(x)
    shared = layers.Conv2D(4, 1, name="shared")
    p = shared(x)
    q = shared(layers.LeakyReLU(name="leaky")(x))
    x = layers.Maximum(name="max")([p, q]) + layers.Minimum(name="min")([p, q])
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _misc_layers():
    inputs = keras.Input((16, 3))
    x = layers.Conv1D(6, 3, padding="same", name="c1")(inputs)
    x = layers.PReLU(name="prelu")(x)
    x = layers.Reshape((4, 4, 6), name="to2d")(x)
    x = layers.Conv2DTranspose(5, 3, strides=2, padding="same", name="tconv")(x)
    x = layers.UpSampling2D(2, name="up")(x)
    x = layers.Rescaling([1.0, 2.0, 3.0, 4.0, 5.0], offset=0.5, name="rescale")(x)
    x = layers.Normalization(mean=[0.1, 0.2, 0.3, 0.4, 0.5], variance=[1, 2, 3, 4, 5], name="norm")(
        x
    )
    adapted = layers.Normalization(name="adapted")
    adapted.adapt(np.random.default_rng(0).normal(1.0, 2.0, size=(16, 16, 16, 5)).astype("float32"))
    x = adapted(x)
    x = layers.Activation("softplus", name="softplus")(x)
    y = layers.Conv2D(5, 1, activation="sigmoid", name="gate")(x)
    x = layers.Average(name="avg")([x, y])
    x = layers.SpatialDropout2D(0.2, name="sdrop")(x)
    x = layers.Conv2D(4, 3, strides=2, name="c3")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(3, name="logits")(x))


def _sequential():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            layers.Conv2D(5, 3, name="c1"),
            layers.BatchNormalization(name="c1_bn"),
            layers.Conv2D(6, 1, activation="gelu", name="c2"),
            layers.Flatten(name="flat"),
            layers.Dense(3, name="logits"),
        ],
        name="seq",
    )


COUPLINGS = {
    "sequential": _sequential,
    "conv_chain": _conv_chain,
    "residual_add": _residual_add,
    "projection_shortcut": _projection_shortcut,
    "concat": _concat,
    "depthwise": _depthwise,
    "se_multiply": _se_multiply,
    "flatten_dense": _flatten_dense,
    "nested_model": _nested,
    "misc_layers_and_nonzero_f0": _misc_layers,
}


@pytest.mark.parametrize("kind", sorted(COUPLINGS))
def test_strip_channels_preserves_outputs_per_coupling_kind(kind):
    model = COUPLINGS[kind]()
    groups = channel_groups(model)
    prunable = [g for g in groups if g.prunable]
    # Only model inputs and outputs are unprunable in these models.
    assert len(prunable) == len(groups) - 2, [(g.id, g.reason) for g in groups if not g.prunable]
    _check_strip(model)


@pytest.mark.parametrize("kind", sorted(COUPLINGS))
def test_empty_plan_rebuilds_reproduce_the_model(kind):
    model = COUPLINGS[kind]()
    rng = np.random.default_rng(4)
    _perturb_batchnorm(model, rng)
    x = _inputs(model, rng)
    expected = model(x)
    _assert_close(expected, apply_plan(model, {})(x))
    _assert_close(expected, strip_channels(model, {})(x))


def _zoo_kwargs(name):
    if name.startswith("resnet"):
        return {"width": 2, "input_shape": (8, 8, 1), "num_classes": 3}
    if name.startswith("vgg"):
        return {"width_multiplier": 1 / 32, "input_shape": (8, 8, 1), "num_classes": 3}
    if name.startswith("densenet"):
        return {"depth": 10, "growth_rate": 2, "input_shape": (8, 8, 1), "num_classes": 3}
    return {"alpha": 0.1, "input_shape": (8, 8, 3), "num_classes": 3}


@pytest.mark.parametrize("name", models.names())
def test_strip_channels_preserves_outputs_for_zoo_model(name):
    model = models.get(name, **_zoo_kwargs(name))
    _, stripped = _check_strip(model)
    assert [layer.name for layer in stripped.layers] == [layer.name for layer in model.layers]


# keras.applications models at 32×32 (weights=None), for the strip and merge tests.
KERAS_APPLICATIONS = pytest.mark.parametrize(
    "builder",
    [
        lambda: keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4,
            classifier_activation=None,
        ),
        lambda: keras.applications.ResNet50(
            input_shape=(32, 32, 3), weights=None, classes=4, classifier_activation=None
        ),
    ],
    ids=["MobileNetV2", "ResNet50"],
)  # fmt: skip


@KERAS_APPLICATIONS
def test_strip_channels_preserves_outputs_for_keras_applications(builder):
    model = builder()
    groups = channel_groups(model)
    assert sum(g.prunable for g in groups) == len(groups) - 2
    _check_strip(model, fraction=0.25)


# -- properties of the stripped model ------------------------------------------


def test_strip_channels_slices_to_the_kept_counts_and_leaves_input_untouched():
    model = _projection_shortcut()
    before = [w.numpy().copy() for w in model.weights]
    plan = PruningPlan({"stem_conv": [1, 3], "stage2_block1_conv2": [0, 1, 2, 7]})
    stripped = strip_channels(model, plan)
    assert stripped.get_layer("stem_conv").filters == 2
    assert stripped.get_layer("stage1_block1_conv2").filters == 2
    assert stripped.get_layer("stage1_block1_conv1").kernel.shape == (3, 3, 2, 4)
    assert stripped.get_layer("stage2_block1_proj").kernel.shape == (1, 1, 2, 4)
    assert stripped.get_layer("stage2_block1_proj_bn").moving_mean.shape == (4,)
    assert stripped.get_layer("stage3_block1_conv1").kernel.shape == (3, 3, 4, 16)
    np.testing.assert_array_equal(
        stripped.get_layer("stem_conv").kernel.numpy(),
        model.get_layer("stem_conv").kernel.numpy()[..., [1, 3]],
    )
    sizes = {g.id: g.size for g in channel_groups(stripped)}
    assert sizes["stem_conv"] == 2 and sizes["stage2_block1_conv2"] == 4
    for old, now in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, now.numpy())
    assert all(len(layer._inbound_nodes) == 1 for layer in model.layers)


def test_strip_channels_of_masked_model_drops_masks_and_trains(tiny_images):
    x, y = tiny_images
    model = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
    plan = PruningPlan({"stem_conv": [0, 2]})
    masked = apply_plan(model, plan)
    stripped = strip_channels(masked, plan)
    _assert_close(masked(x[:4]), stripped(x[:4]))
    constraints = [
        w.constraint for layer in stripped.layers for w in layer.weights if w.constraint is not None
    ]
    assert not any(isinstance(c, ChannelMask) for c in constraints)
    stripped.compile(
        optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )  # fmt: skip
    history = stripped.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_strip_channels_empty_plan_copies_the_model():
    model = _conv_chain()
    copy = strip_channels(model, PruningPlan({}))
    x = _inputs(model, np.random.default_rng(0))
    np.testing.assert_array_equal(model(x), copy(x))
    assert copy is not model and copy.get_layer("c1") is not model.get_layer("c1")


def test_strip_channels_rejects_a_plan_for_another_model():
    with pytest.raises(ValueError, match="Unknown group id 'stem_conv'"):
        strip_channels(_conv_chain(), {"stem_conv": [0]})


def test_plan_macs_counts_the_stripped_model_exactly():
    model = models.resnet_cifar(8, width=8, input_shape=(8, 8, 3))
    rng = np.random.default_rng(3)
    for _ in range(3):
        plan = _random_plan(model, rng, fraction=rng.uniform(0.2, 0.9))
        stripped = strip_channels(model, plan)
        assert plan_macs(model, plan) == metrics.count_macs(stripped)
        assert plan_params(model, plan) == metrics.count_params(stripped)
    assert plan_macs(model, {}) == metrics.count_macs(model)


# -- batch-norm folding ---------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["projection_shortcut", "depthwise", "flatten_dense", "nested_model", "sequential"]
)
def test_fold_batchnorm_preserves_inference_outputs(kind):
    model = COUPLINGS[kind]()
    rng = np.random.default_rng(1)
    _perturb_batchnorm(model, rng)
    folded = fold_batchnorm(model)
    x = _inputs(model, rng)
    _assert_close(model(x, training=False), folded(x, training=False))
    before = sum(isinstance(layer, layers.BatchNormalization) for layer in _all_layers(model))
    after = sum(isinstance(layer, layers.BatchNormalization) for layer in _all_layers(folded))
    assert before > 0 and after == 0


def test_fold_batchnorm_skips_unsafe_pairs():
    inputs = keras.Input((6, 6, 2))
    a = layers.Conv2D(3, 1, activation="relu", name="relu_conv")(inputs)
    a = layers.BatchNormalization(name="after_relu")(a)
    b = layers.Conv2D(3, 1, name="branching")(inputs)
    c = layers.BatchNormalization(name="branch_bn")(b)
    x = layers.Concatenate()([a, b, c])
    model = keras.Model(inputs, x)
    _perturb_batchnorm(model, np.random.default_rng(2))
    folded = fold_batchnorm(model)
    names = {layer.name for layer in folded.layers}
    assert {"after_relu", "branch_bn"} <= names
    x_in = _inputs(model, np.random.default_rng(2))
    _assert_close(model(x_in), folded(x_in))


def test_fold_batchnorm_of_stripped_zoo_model():
    model = models.resnet_cifar(8, width=4, input_shape=(8, 8, 1), num_classes=3)
    _, stripped = _check_strip(model, seed=5)
    folded = fold_batchnorm(stripped)
    x = _inputs(model, np.random.default_rng(5))
    _assert_close(stripped(x), folded(x))
    assert metrics.count_macs(folded) == metrics.count_macs(stripped)


# -- channel merging (PDC / C-SGD) ------------------------------------------------


def _random_clusters(model, rng, fraction=0.5, skip=()):
    """Each prunable group split into ~fraction·size non-empty clusters, members at random."""
    clusters = {}
    for group in channel_groups(model):
        if group.prunable and group.size > 1 and group.id not in skip:
            count = max(1, int(round(group.size * fraction)))
            labels = np.concatenate([np.arange(count), rng.integers(0, count, group.size - count)])
            rng.shuffle(labels)
            clusters[group.id] = [np.flatnonzero(labels == c).tolist() for c in range(count)]
    return clusters


def _average_in_place(model, clusters):
    """Makes every cluster's owned slices equal, in place (test set-up, no rebuild)."""
    from tfkdp.pruning.analysis import analyze
    from tfkdp.pruning.clustering import owned_refs

    analysis = analyze(model)
    for group_id, members in clusters.items():
        group = analysis.group_by_id[group_id]
        for ref in owned_refs(analysis, group):
            variable = getattr(analysis.layer_at(ref.layer), ref.attr)
            value = variable.numpy()
            moved = np.moveaxis(value, ref.axis, 0)
            for cluster in members:
                rows = ref.indices(group.size)[cluster]
                moved[rows] = moved[rows].mean(axis=0, keepdims=True)
            variable.assign(value)


def _check_merge_of_identical(model, fraction=0.5):
    """One rebuild: members made identical in place, then merge == model."""
    rng = np.random.default_rng(0)
    _perturb_batchnorm(model, rng)
    clusters = _random_clusters(model, rng, fraction)
    _average_in_place(model, clusters)
    x = _inputs(model, rng)
    _assert_close(model(x), merge_channels(model, clusters)(x))


def _check_merge(model, seed=0, fraction=0.5, skip=()):
    """merge_channels(model) == hard_average(model); MACs as the representatives' plan says."""
    rng = np.random.default_rng(seed)
    _perturb_batchnorm(model, rng)
    clusters = _random_clusters(model, rng, fraction, skip)
    assert clusters
    x = _inputs(model, rng)
    before = [w.numpy().copy() for w in model.weights]
    averaged = hard_average(model, clusters)
    merged = merge_channels(model, clusters)
    _assert_close(averaged(x), merged(x))
    # Input untouched (functional surgery).
    for old, w in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(old, w.numpy())
    plan = PruningPlan({g: [c[0] for c in members] for g, members in clusters.items()})
    assert metrics.count_macs(merged) == plan_macs(model, plan) < metrics.count_macs(model)
    assert metrics.count_params(merged) == plan_params(model, plan)
    return clusters, merged


@pytest.mark.parametrize("kind", sorted(set(COUPLINGS) - {"misc_layers_and_nonzero_f0"}))
def test_merge_channels_equals_hard_average_per_coupling_kind(kind):
    # BN, activations, residual adds, concat offsets, Flatten → Dense, depthwise and
    # separable convolutions (depthwise slices averaged, pointwise rows summed).
    _check_merge(COUPLINGS[kind]())


def test_merge_channels_refuses_per_channel_config_constants_and_merges_the_rest():
    model = _misc_layers()
    # 'tconv' channels pass a Rescaling with one scale per channel: not mergeable.
    with pytest.raises(ValueError, match="group 'tconv'.*'rescale' \\(Rescaling\\)"):
        merge_channels(model, {"tconv": [[0, 1], [2], [3], [4]]})
    # The other groups (PReLU, adapted Normalization weights, Average) merge exactly.
    _check_merge(model, skip=("tconv",))


@pytest.mark.parametrize("name", models.names())
def test_merge_channels_of_identical_channels_is_exact_for_zoo_model(name):
    _check_merge_of_identical(models.get(name, **_zoo_kwargs(name)))


@KERAS_APPLICATIONS
def test_merge_channels_of_identical_channels_is_exact_for_keras_applications(builder):
    _check_merge_of_identical(builder(), fraction=0.75)


def test_merge_channels_of_identical_channels_reproduces_the_model():
    # After hard averaging the members already agree: merging changes nothing.
    model = _residual_add()
    rng = np.random.default_rng(5)
    _perturb_batchnorm(model, rng)
    clusters = _random_clusters(model, rng)
    averaged = hard_average(model, clusters)
    x = _inputs(model, rng)
    _assert_close(averaged(x), merge_channels(averaged, clusters)(x))
    # ... and hard averaging made every cluster's producer kernel slices equal.
    group = next(g for g in channel_groups(averaged) if g.id in clusters)
    kernel = averaged.get_layer(group.producers[0]).kernel.numpy()
    for members in clusters[group.id]:
        np.testing.assert_allclose(kernel[..., members], kernel[..., members[:1]].repeat(len(members), -1), rtol=1e-6)


def test_merge_channels_with_singleton_clusters_equals_strip():
    model = models.resnet_cifar(8, width=4, input_shape=(8, 8, 3))
    rng = np.random.default_rng(2)
    _perturb_batchnorm(model, rng)
    groups = [g for g in channel_groups(model) if g.prunable]
    clusters = {g.id: [[i] for i in range(g.size)] for g in groups}
    merged = merge_channels(model, clusters)
    stripped = strip_channels(model, {g.id: range(g.size) for g in groups})
    # Nothing to average or sum: the same weights, value for value, as strip.
    assert len(merged.weights) == len(stripped.weights)
    for a, b in zip(merged.weights, stripped.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = _inputs(model, rng)
    _assert_close(model(x), merged(x))
    assert metrics.count_macs(merged) == metrics.count_macs(model)


@pytest.mark.parametrize(
    "clusters, message",
    [
        ({"stage1_block1_conv1": [[0, 1], [1, 2], [3]]}, "'stage1_block1_conv1': channel 1 is in clusters 0 and 1"),
        ({"stage1_block1_conv1": [[0, 1], [2, 3, 9]]}, "'stage1_block1_conv1': cluster 1 holds channel 9.*cannot span groups"),
        ({"stage1_block1_conv1": [[0, 1, 2, 3], []]}, "'stage1_block1_conv1': cluster 1 is empty"),
        ({"stage1_block1_conv1": [[0, 1], [2]]}, "'stage1_block1_conv1': channels \\[3\\] are in no cluster"),
        ({"nope": [[0]]}, "unknown group id 'nope'"),
    ],
    ids=["channel_in_two_clusters", "cluster_across_groups", "empty_cluster", "not_a_partition", "unknown_group"],
)  # fmt: skip
def test_merge_channels_rejects_bad_clusters_naming_the_group(clusters, message):
    model = models.resnet_cifar(8, width=4, input_shape=(8, 8, 3))
    with pytest.raises(ValueError, match=message):
        merge_channels(model, clusters)
    with pytest.raises(ValueError, match=message):
        hard_average(model, clusters)

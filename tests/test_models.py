import keras
import numpy as np
import pytest

from tfkdp import export, metrics, models
from tfkdp.pruning import PruningPlan, apply_plan, channel_groups, strip_channels


@pytest.mark.parametrize("name", models.names())
def test_every_zoo_model_builds_and_outputs_logits(name):
    kwargs = {"input_shape": (16, 16, 3), "num_classes": 7}
    if name.startswith("resnet"):
        kwargs["width"] = 4
    elif name.startswith("vgg"):
        kwargs["width_multiplier"] = 0.0625
    elif name.startswith("densenet"):
        kwargs.update(depth=10, growth_rate=4)
    elif name.startswith("efficientnet"):
        kwargs.update(alpha=0.25, depth_coefficient=0.25)
    else:
        kwargs["alpha"] = 0.25
    model = models.get(name, **kwargs)
    out = model(np.zeros((2, 16, 16, 3), "float32"), training=False)
    assert tuple(out.shape) == (2, 7)
    assert metrics.count_macs(model) > 0


@pytest.mark.parametrize("depth, convs", [(8, 7), (20, 19), (56, 55)])
def test_resnet_depth_counts_weighted_layers(depth, convs):
    model = models.resnet_cifar(depth, width=4, input_shape=(8, 8, 1))
    main_path = [
        layer for layer in model.layers
        if layer.__class__.__name__ == "Conv2D" and not layer.name.endswith("proj")
    ]
    # depth = convs on the main path + the final Dense
    assert len(main_path) == convs


def test_resnet_projection_shortcut_only_where_shape_changes():
    model = models.resnet_cifar(14, width=4, input_shape=(8, 8, 1))
    projections = [layer.name for layer in model.layers if layer.name.endswith("_proj")]
    assert projections == ["stage2_block1_proj", "stage3_block1_proj"]


def test_mobilenet_v2_has_residual_adds_and_depthwise():
    model = models.mobilenet_v2_cifar(0.25, input_shape=(16, 16, 3))
    kinds = {layer.__class__.__name__ for layer in model.layers}
    assert {"DepthwiseConv2D", "Add"} <= kinds
    assert all(layer.filters % 8 == 0 for layer in model.layers if hasattr(layer, "filters"))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: models.get("resnet21"), "valid names"),
        (lambda: models.resnet_cifar(21), "6n\\+2"),
        (lambda: models.vgg_cifar(12), "one of"),
        (lambda: models.mobilenet_v2_cifar(0), "alpha"),
        (lambda: models.densenet_bc_cifar(12), "6n\\+4.*depth=12"),
        (lambda: models.densenet_bc_cifar(10, growth_rate=0), "growth_rate=0"),
        (lambda: models.densenet_bc_cifar(10, compression=1.5), "compression=1.5"),
        (lambda: models.efficientnet_cifar(0), "alpha=0"),
        (lambda: models.efficientnet_cifar(0.5, depth_coefficient=-1), "depth_coefficient=-1"),
        (lambda: models.resnet_cifar(8, input_shape=(28, 28)), "input_shape"),
        (lambda: models.resnet_cifar(8, num_classes=1), "num_classes"),
    ],
)
def test_bad_model_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_densenet_bc_dense_blocks_concatenate_growth_rate_channels_per_layer():
    model = models.densenet_bc_cifar(16, growth_rate=6, compression=0.5, input_shape=(16, 16, 1))
    # (16 - 4) / 6 = 2 bottleneck layers per block; stem 2k = 12 channels
    concats = [layer for layer in model.layers if isinstance(layer, keras.layers.Concatenate)]
    assert len(concats) == 6
    assert model.get_layer("block1_layer2_concat").output.shape[-1] == 12 + 2 * 6
    # the transition halves the channels: floor(24 · 0.5) = 12, then the block adds 2·6
    assert model.get_layer("transition1_conv").output.shape[-1] == 12
    assert model.get_layer("block2_layer2_concat").output.shape[-1] == 12 + 2 * 6
    bottleneck = model.get_layer("block1_layer1_1_conv")
    assert bottleneck.filters == 4 * 6 and bottleneck.kernel_size == (1, 1)


def test_efficientnet_blocks_have_squeeze_excitation_swish_and_residuals():
    model = models.efficientnet_cifar(0.25, 0.5, input_shape=(16, 16, 3), num_classes=4)
    names = [layer.name for layer in model.layers]
    blocks = sorted({n.split("_")[0] for n in names if n.startswith("block")})
    # B0 repeats (1, 2, 2, 3, 3, 4, 1) at depth 0.5, rounded up: 1+1+1+2+2+2+1
    assert len(blocks) == 10
    assert sum(n.endswith("_se_excite") for n in names) == len(blocks)
    assert any(n.endswith("_add") for n in names)
    assert model.get_layer("block2_dw_swish").get_config()["activation"] in ("swish", "silu")
    reduce = model.get_layer("block2_se_reduce")
    # the SE bottleneck is a quarter of the block's input channels
    assert reduce.filters == max(1, model.get_layer("block1_project").filters // 4)


def _perturb(model, rng):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, size).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, size).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, size).astype("float32"))


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.densenet_bc_cifar(10, growth_rate=4, input_shape=(12, 12, 1), num_classes=3),
        lambda: models.efficientnet_cifar(0.25, 0.25, input_shape=(12, 12, 1), num_classes=3),
    ],
    ids=["densenet_bc", "efficientnet"],
)
def test_new_zoo_families_prune_strip_and_export(build, tmp_path):
    model = build()
    rng = np.random.default_rng(0)
    _perturb(model, rng)
    groups = [g for g in channel_groups(model) if g.prunable]
    # every conv's channels can be pruned: only the input and the logits are not
    assert len(groups) == len(channel_groups(model)) - 2
    plan = PruningPlan({
        g.id: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
        for g in groups if g.size > 1
    })  # fmt: skip
    x = rng.uniform(size=(4, 12, 12, 1)).astype("float32")
    masked, stripped = apply_plan(model, plan), strip_channels(model, plan)
    expected, got = np.asarray(masked(x)), np.asarray(stripped(x))
    # masked == stripped to 1e-5 of the output scale (float32 summation order only)
    assert np.abs(expected - got).max() <= 1e-5 * np.abs(expected).max()
    assert metrics.count_macs(stripped) < metrics.count_macs(model)
    paths = export.export_model(stripped, str(tmp_path / "out"), formats=("tflite", "onnx"))
    results = export.verify(stripped, dict(paths), x)
    for fmt in ("tflite", "onnx"):
        assert results[fmt]["max_abs_diff_rel"] <= 1e-4, fmt

import numpy as np
import pytest

from tfkdp import metrics, models


@pytest.mark.parametrize("name", models.names())
def test_every_zoo_model_builds_and_outputs_logits(name):
    kwargs = {"input_shape": (16, 16, 3), "num_classes": 7}
    if name.startswith("resnet"):
        kwargs["width"] = 4
    elif name.startswith("vgg"):
        kwargs["width_multiplier"] = 0.0625
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
        (lambda: models.resnet_cifar(8, input_shape=(28, 28)), "input_shape"),
        (lambda: models.resnet_cifar(8, num_classes=1), "num_classes"),
    ],
)
def test_bad_model_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()

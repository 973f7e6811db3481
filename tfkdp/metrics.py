"""Model cost and quality figures: MACs, parameters, accuracy.

MACs are multiply-accumulates of one forward pass at batch size 1. Counted:
`Conv1D`/`Conv2D`/`Conv3D` (strides, padding, dilation and `groups` handled
through the layer's real output shape), `DepthwiseConv2D`/`DepthwiseConv1D`
(depth multiplier), `SeparableConv1D`/`SeparableConv2D` (depthwise +
pointwise), `Conv2DTranspose` and `Dense` (applied to every leading position
of its input). Not counted, by convention (they are memory-bound and small):
biases, batch normalisation, activations, pooling, element-wise merges.

Note that a channel ratio is not a MAC ratio: removing half the channels of a
layer roughly quarters the MACs of the next conv, which is why pruning budgets
in tfkdp are stated as MAC (or parameter) reduction.
"""

import math

import keras
import numpy as np

__all__ = ["count_macs", "count_params", "layer_macs", "accuracy"]


def _prod(values):
    return int(math.prod(int(v) for v in values))


def _conv_macs(layer, in_shape, out_shape):
    cin = int(in_shape[-1])
    cout = int(out_shape[-1])
    kernel = _prod(layer.kernel_size)
    groups = int(getattr(layer, "groups", 1) or 1)
    return _prod(out_shape[1:-1]) * cout * kernel * (cin // groups)


def _conv_transpose_macs(layer, in_shape, out_shape):
    # Every input position scatters a k×k×cout patch: in_positions·cin·k·cout/groups.
    cin = int(in_shape[-1])
    cout = int(out_shape[-1])
    groups = int(getattr(layer, "groups", 1) or 1)
    return _prod(in_shape[1:-1]) * cin * _prod(layer.kernel_size) * (cout // groups)


def _depthwise_macs(layer, in_shape, out_shape):
    return _prod(out_shape[1:-1]) * int(out_shape[-1]) * _prod(layer.kernel_size)


def _separable_macs(layer, in_shape, out_shape):
    cin = int(in_shape[-1])
    mid = cin * int(layer.depth_multiplier)
    positions = _prod(out_shape[1:-1])
    return positions * mid * _prod(layer.kernel_size) + positions * mid * int(out_shape[-1])


def _dense_macs(layer, in_shape, out_shape):
    return _prod(in_shape[1:-1]) * int(in_shape[-1]) * int(out_shape[-1])


# Most specific classes first: SeparableConv and Conv2DTranspose subclass the
# base convolution, and isinstance() picks the first match.
_MAC_RULES = (
    (keras.layers.SeparableConv1D, _separable_macs),
    (keras.layers.SeparableConv2D, _separable_macs),
    (keras.layers.DepthwiseConv1D, _depthwise_macs),
    (keras.layers.DepthwiseConv2D, _depthwise_macs),
    (keras.layers.Conv1DTranspose, _conv_transpose_macs),
    (keras.layers.Conv2DTranspose, _conv_transpose_macs),
    (keras.layers.Conv3DTranspose, _conv_transpose_macs),
    (keras.layers.Conv1D, _conv_macs),
    (keras.layers.Conv2D, _conv_macs),
    (keras.layers.Conv3D, _conv_macs),
    (keras.layers.Dense, _dense_macs),
)


def _shape(tensor):
    return tuple(1 if d is None else int(d) for d in tensor.shape)


def layer_macs(model):
    """Per-call MACs of every counted layer, nested models included.

    Args:
        model: a built functional or sequential `keras.Model`.

    Returns:
        A list of `(layer_path, macs)` in graph order; a layer called twice
        appears twice, a nested model's layers appear as `outer/inner`.

    Raises:
        ValueError: if the model is not built (no known input shape).
    """
    if not model.built or not getattr(model, "_inbound_nodes", None) and not hasattr(model, "inputs"):
        raise ValueError(
            f"count_macs needs a built model with a known input shape; model {model.name!r} is not "
            "built. Call it on an input or build it with an Input layer first."
        )
    result = []
    _collect(model, "", result, calls=1)
    return result


def _collect(model, prefix, result, calls):
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        nodes = [n for n in getattr(layer, "_inbound_nodes", [])]
        if isinstance(layer, keras.Model):
            _collect(layer, f"{path}/", result, calls * max(1, len(_nodes_in(model, layer))))
            continue
        rule = next((fn for cls, fn in _MAC_RULES if isinstance(layer, cls)), None)
        if rule is None:
            continue
        for node in _nodes_in(model, layer) or nodes[:1]:
            in_shape = _shape(node.input_tensors[0])
            out_shape = _shape(node.outputs[0])
            result.append((path, calls * rule(layer, in_shape, out_shape)))


def _nodes_in(model, layer):
    """The nodes of `layer` that belong to `model`'s own graph."""
    own = getattr(model, "_nodes_by_depth", None)
    if not own:
        return list(getattr(layer, "_inbound_nodes", []))[:1]
    members = {id(n) for nodes in own.values() for n in nodes}
    return [n for n in layer._inbound_nodes if id(n) in members]


def count_macs(model):
    """Multiply-accumulates of one forward pass at batch size 1.

    See the module docstring for what is counted. Nested functional models
    are counted through; a shared layer is counted once per call.

    Args:
        model: a built `keras.Model` with a fixed input shape.

    Returns:
        The MAC count as a Python `int`.

    Example:
        >>> from tfkdp import models
        >>> count_macs(models.resnet_cifar(56, input_shape=(32, 32, 3))) // 10**6
        126
    """
    return int(sum(m for _, m in layer_macs(model)))


def count_params(model, trainable_only=False):
    """Number of parameters (all weights, or trainable weights only).

    Batch-norm moving statistics count as parameters (they ship with the
    model), matching `model.count_params()`.

    Args:
        model: a built `keras.Model`.
        trainable_only: count only trainable weights.

    Returns:
        The parameter count as a Python `int`.
    """
    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(np.prod(w.shape) for w in weights))


def accuracy(model, x, y, batch_size=256):
    """Top-1 accuracy of `model` on `(x, y)` (integer labels), in [0, 1]."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(y).reshape(-1)))

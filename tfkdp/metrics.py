"""Model cost and quality figures: MACs, parameters, accuracy, Performance Efficiency.

MACs are multiply-accumulates of one forward pass at batch size 1, summed
over the calls of the one graph walk (`tfkdp.pruning.walker`) with each
layer's rule from the per-layer handler registry. Counted:
`Conv1D`/`Conv2D`/`Conv3D` (strides, padding, dilation and `groups` handled
through the layer's real output shape), `DepthwiseConv2D`/`DepthwiseConv1D`
(depth multiplier), `SeparableConv1D`/`SeparableConv2D` (depthwise +
pointwise), `Conv2DTranspose` and `Dense` (applied to every leading position
of its input). Not counted, by convention (they are memory-bound and small):
biases, batch normalisation, activations, pooling, element-wise merges.

Note that a channel ratio is not a MAC ratio: removing half the channels of a
layer roughly quarters the MACs of the next conv, which is why pruning budgets
in tfkdp are stated as MAC (or parameter) reduction.

Zeros are not free parameters of a dense kernel, but they are of a sparse
format: `count_nonzero_params` counts the entries that are not exactly zero,
the figure weight (unstructured) pruning reduces.
"""

import math

import numpy as np

__all__ = [
    "count_macs", "count_params", "count_nonzero_params", "layer_macs", "accuracy",
    "performance_efficiency",
]


def layer_macs(model):
    """Per-call MACs of every counted layer, nested models included.

    The MACs of a call come from its layer's handler (`LayerHandler.macs`,
    `tfkdp.register_layer`); a subclass of a registered layer is counted
    like its registered base.

    Args:
        model: a built functional or sequential `keras.Model`.

    Returns:
        A list of `(layer_path, macs)` in graph order; a layer called twice
        appears twice, a nested model's layers appear as `outer/inner`.

    Raises:
        ValueError: if the model is not built (no known input shape) or has
            no functional graph.
    """
    from tfkdp.pruning.analysis import get_handler
    from tfkdp.pruning.walker import FlatGraph

    if not model.built or graph_of_or_none(model) is None:
        raise ValueError(
            f"count_macs needs a built functional or Sequential model with a known input shape; "
            f"model {getattr(model, 'name', model)!r} is not. Call it on an Input first."
        )
    flat = FlatGraph(model)
    result = []
    for node in flat.nodes:
        handler = get_handler(node.layer, inherit=True)
        if handler is None or not node.inputs:
            continue
        in_shapes = [_shape(flat.shapes[k]) for k in node.inputs]
        out_shapes = [_shape(flat.shapes[k]) for k in node.outputs]
        macs = handler.macs(node.layer, in_shapes, out_shapes)
        if macs:
            result.append((node.path, int(macs)))
    return result


def graph_of_or_none(model):
    from tfkdp.pruning.walker import graph_of

    return graph_of(model)


def _shape(shape):
    return tuple(1 if d is None else int(d) for d in shape)


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
        125
    """
    return int(sum(m for _, m in layer_macs(model)))


def count_params(model, trainable_only=False):
    """Number of parameters (all weights, or trainable weights only).

    Batch-norm moving statistics count as parameters (they ship with the
    model), matching `model.count_params()`; pruning masks
    (`tfkdp.pruning.masks`) are training state, not parameters, and are not
    counted.

    Args:
        model: a built `keras.Model`.
        trainable_only: count only trainable weights.

    Returns:
        The parameter count as a Python `int`.
    """
    from tfkdp.pruning.masks import is_mask_variable

    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(np.prod(w.shape) for w in weights if not is_mask_variable(w)))


def accuracy(model, x, y, batch_size=256):
    """Top-1 accuracy of `model` on `(x, y)` (integer labels), in [0, 1]."""
    logits = model.predict(x, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(y).reshape(-1)))


def count_nonzero_params(model, trainable_only=False):
    """Number of parameter entries that are not exactly zero.

    Counts the same weights as `count_params` (batch-norm moving statistics
    included, pruning masks excluded), entry by entry. A weight-pruned model
    has as many parameters as its dense original but fewer non-zero ones; a
    channel-pruned and stripped model has fewer of both.

    Args:
        model: a built `keras.Model`.
        trainable_only: count only trainable weights.

    Returns:
        The count as a Python `int`.

    Example:
        >>> dense = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, use_bias=False)])
        >>> _ = dense.layers[0].kernel.assign([[1.0, 0.0], [0.0, 3.0]])
        >>> count_nonzero_params(dense), count_params(dense)
        (2, 4)
    """
    from keras import ops

    from tfkdp.pruning.masks import is_mask_variable

    weights = model.trainable_weights if trainable_only else model.weights
    return int(sum(
        np.count_nonzero(ops.convert_to_numpy(w)) for w in weights if not is_mask_variable(w)
    ))  # fmt: skip


def performance_efficiency(accuracy, reference_accuracy, cost, reference_cost):
    """Performance Efficiency: accuracy kept per unit of cost kept (tfkdp's definition).

    `PE = (accuracy / reference_accuracy) / (cost / reference_cost)`.

    The reference is the uncompressed model (for a student, its teacher or
    its dense self), and the cost any positive figure where less is better:
    non-zero parameters, MACs, file bytes, milliseconds. PE = 1 for the
    reference itself; a compressed model that keeps 99 % of the accuracy at
    half the cost has PE = 1.98. It is a ratio of ratios, so it is the same
    whatever units the cost is in. It rewards cost without bound: a model at
    chance accuracy with almost no parameters scores high, so read PE beside
    the accuracy, never alone.

    Malihi & Heidemann (2024) introduce a metric of this name to compare
    weight and channel pruning under knowledge distillation. Their formula
    could not be retrieved here (the stored copies of the paper hold only the
    abstract and introduction), so this is tfkdp's own definition in the
    metric's spirit, not a reproduction of theirs; numbers are not comparable
    with the paper's tables.

    Args:
        accuracy: the compressed model's accuracy (>= 0, any consistent unit).
        reference_accuracy: the reference model's accuracy (> 0).
        cost: the compressed model's cost (> 0).
        reference_cost: the reference model's cost (> 0, the same unit).

    Returns:
        PE as a float.

    Raises:
        ValueError: for a negative or non-finite accuracy, a reference
            accuracy <= 0, or a cost <= 0 (naming the value).

    Example:
        >>> performance_efficiency(0.9, 0.92, 250_000, 1_000_000)
        3.9130434782608696

    Reference:
        Malihi & Heidemann, "Matching the Ideal Pruning Method with Knowledge
        Distillation for Optimal Compression", Applied System Innovation
        7(4):56, 2024 (the metric's name and purpose; the formula is ours).
    """
    from tfkdp import checks

    accuracy = checks.check_number("accuracy", accuracy, 0)
    reference_accuracy = checks.check_number("reference_accuracy", reference_accuracy, 0, strict=True)
    cost = checks.check_number("cost", cost, 0, strict=True)
    reference_cost = checks.check_number("reference_cost", reference_cost, 0, strict=True)
    value = (accuracy / reference_accuracy) / (cost / reference_cost)
    if not math.isfinite(value):
        raise ValueError(
            f"performance_efficiency overflowed for accuracy={accuracy!r}, cost={cost!r}, "
            f"reference_cost={reference_cost!r}"
        )
    return value

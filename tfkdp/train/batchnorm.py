"""Batch-norm re-estimation (adaptive BN): exact moving statistics for moved weights."""

import keras

from tfkdp import checks

__all__ = ["recalibrate_batchnorm", "all_layers"]


def recalibrate_batchnorm(model, data, num_batches=100):
    """Re-estimates every batch norm's moving statistics on `data`; no weight changes.

    The moving averages (momentum 0.99) lag behind weights that moved fast:
    short training at a high learning rate, ADMM shrinking channels, or a hard
    prune. This replaces them with the exact average of the batch statistics
    over `num_batches` batches (as in adaptive-BN evaluation of pruned nets).

    Args:
        model: a model containing `BatchNormalization` layers (nested included).
        data: a `tf.data.Dataset` of `(x, ...)` batches or of `x`.
        num_batches: how many batches to average (>= 1).

    Returns:
        The number of batch-norm layers recalibrated.

    Reference:
        Li et al., "EagleEye: Fast Sub-net Evaluation for Efficient Neural
        Network Pruning", ECCV 2020 (adaptive batch-norm).
    """
    checks.check_int("num_batches", num_batches, 1)
    layers = [
        layer for layer in all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]  # fmt: skip
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    try:
        for i, batch in enumerate(data.take(num_batches)):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for layer in layers:
                # moving ← moving·(i/(i+1)) + batch/(i+1): the running mean of batch statistics.
                layer.momentum = i / (i + 1.0)
            model(x, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return len(layers)


def all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)

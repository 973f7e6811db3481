"""Model surgery: remove pruned channels for real, merge channels, fold batch norm.

`strip_channels(model, plan)` rebuilds a functional model with every weight
sliced along every axis a pruned channel touches (producer kernels and
biases, batch-norm parameters and moving statistics, depthwise kernels,
consumer kernels, dense rows after `Flatten`, concatenation offsets), using
the channel groups of `tfkdp.pruning.analysis`. The result is a new, smaller
model that computes what `tfkdp.apply_plan(model, plan)` computes; the input
model is never modified. How a layer's constructor arguments change
(`filters`, `units`, a `Reshape` target) comes from the per-layer handler
registry (`tfkdp.register_layer`, `LayerHandler.strip_config`).

`merge_channels(model, clusters)` removes channels by merging each cluster of
a group into one representative (the consumers' input slices of the members
are summed into the representative's, `LayerHandler.merge_input`): exact when
the members compute the same channel, e.g. after `hard_average(model,
clusters)`. `fold_batchnorm(model)` folds inference-mode batch normalisation
into the preceding layer (`LayerHandler.fold`) for deployment.
"""

import keras
import numpy as np

from tfkdp.pruning.analysis import analyze
from tfkdp.pruning.clustering import cluster_plan, owned_refs, validate_clusters
from tfkdp.pruning.handlers import get_handler
from tfkdp.pruning.rebuild import (
    Rebuild,
    as_plan,
    first_nodes,
    masks_by_variable,
    old_values,
    parameters,
    recreate,
    unmask_config,
)

__all__ = ["strip_channels", "fold_batchnorm", "merge_channels", "hard_average"]


def strip_channels(model, plan):
    """Builds a smaller model without the channels a plan prunes.

    Every weight is sliced wherever a pruned channel appears: producer
    kernels and biases, batch-norm gamma/beta/moving statistics, depthwise
    kernels, the input axis of consumer kernels, dense rows after `Flatten`
    and concatenation offsets. Layer names, the graph and the model name are
    kept; channel masks left by `apply_plan` are dropped (the user's own
    constraints are kept).

    Args:
        model: a functional (or sequential) `keras.Model`; not modified.
        plan: a `PruningPlan` (or a mapping accepted by its constructor).

    Returns:
        A new `keras.Model` whose outputs equal those of
        `tfkdp.apply_plan(model, plan)`.

    Raises:
        ValueError: if the plan does not fit the model (see
            `PruningPlan.validate`) or a layer cannot be re-created.

    Example:
        >>> from tfkdp import models
        >>> from tfkdp import PruningPlan
        >>> model = models.resnet_cifar(8, width=8)
        >>> small = strip_channels(model, PruningPlan({"stage1_block1_conv1": range(4)}))
        >>> small.get_layer("stage1_block1_conv1").filters
        4
    """
    return _strip(model, plan)


def _strip(model, plan, values=None):
    """`strip_channels`, with the values of the variables in `values` ({id: array}) replaced."""
    analysis, plan = as_plan(model, plan)
    pruned = analysis.pruned(plan)
    weight_masks = masks_by_variable(analysis, pruned)
    first = first_nodes(analysis)
    keep_cache = {}

    def tensor_keep(key):
        if key not in keep_cache:
            keep_cache[key] = analysis.tensor_keep(key, pruned) if pruned else None
        return keep_cache[key]

    def make_layer(path, layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Layer):
            config = unmask_config(layer, config)
        handler = get_handler(layer)
        if handler is not None and pruned:
            flat = first[path]
            in_keep = [tensor_keep(k) for k in flat.inputs]
            out_keep = [tensor_keep(k) for k in flat.outputs]
            config = handler.strip_config(layer, config, in_keep, out_keep)
        return recreate(layer, config)

    def weights(path, old, new):
        return _sliced_values(old, weight_masks, values)

    return Rebuild(analysis, make_layer, weights, tensor_keep).run(model)


def _sliced_values(layer, weight_masks, values=None):
    """`old_values`, reading a variable's value from `values` ({id: array}) when listed there."""
    if not values:
        return old_values(layer, weight_masks)
    result = []
    for variable in parameters(layer):
        value = values.get(id(variable))
        value = variable.numpy() if value is None else value.astype(variable.dtype)
        for axis, keep in sorted(weight_masks.get(id(variable), {}).items()):
            value = np.compress(keep, value, axis=axis)
        result.append(value)
    return result



def _foldable_pairs(analysis):
    """{producer path: batch-norm path} of the pairs that can be folded exactly."""
    calls = {}
    for flat in analysis.nodes:
        calls[flat.path] = calls.get(flat.path, 0) + 1
    linear = keras.activations.get("linear")
    pairs = {}
    for flat in analysis.nodes:
        bn = flat.layer
        if type(bn) is not keras.layers.BatchNormalization or calls[flat.path] != 1:
            continue
        rank = len(analysis.shapes[flat.outputs[0]])
        if len(flat.inputs) != 1 or int(bn.axis) % rank != rank - 1 or bn.renorm:
            continue
        if flat.node.arguments.kwargs.get("training") is not None:
            continue  # a forced training mode would not follow the folded statistics
        key = flat.inputs[0]
        producer = analysis.producer_of.get(key)
        if producer is None or calls[producer.path] != 1 or producer.prefix != flat.prefix:
            continue
        handler = get_handler(producer.layer)
        if handler is None or producer.path in pairs:
            continue
        if analysis.consumers[key] != 1 or key in analysis.output_keys:
            continue
        layer = producer.layer
        if getattr(layer, "activation", linear) is not linear:
            continue
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            continue
        pairs[producer.path] = flat.path
    return pairs


def fold_batchnorm(model):
    """Folds inference-mode batch normalisation into the preceding layer.

    A `BatchNormalization` is folded into the layer that feeds it when that
    layer's handler can absorb it (`LayerHandler.fold`: `Conv*`,
    `Conv*Transpose`, `DepthwiseConv*`, `SeparableConv*`, `Dense`, and any
    registered custom layer whose handler says how), the layer has a linear
    activation, is called once, and feeds nothing else; the layer gets a bias, the batch norm disappears. Other batch norms
    stay. Use it on a model for deployment: the folded model computes the
    same function as `model(x, training=False)`.

    Args:
        model: a functional (or sequential) `keras.Model`; not modified.

    Returns:
        A new `keras.Model` without the folded batch-norm layers.

    Raises:
        ValueError: if `model` is not functional or a layer cannot be rebuilt.

    Example:
        >>> from tfkdp import models
        >>> folded = fold_batchnorm(models.resnet_cifar(8, width=4))
        >>> any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
        False
    """
    analysis = analyze(model)
    folded = {}
    for producer, bn in _foldable_pairs(analysis).items():
        layer = analysis.layer_at(producer)
        result = get_handler(layer).fold(layer, analysis.layer_at(bn))
        if result is not None:
            folded[producer] = (bn, *result)

    def make_layer(path, layer):
        config = layer.get_config()
        if path in folded:
            config.update(folded[path][1])
        return recreate(layer, config)

    def weights(path, old, new):
        return folded[path][2] if path in folded else None

    bypass = [bn for bn, _, _ in folded.values()]
    return Rebuild(analysis, make_layer, weights, bypass=bypass).run(model)


def _averaged_values(analysis, clusters):
    """{id(variable): float64 array} of every variable a clustered channel owns, averaged.

    For each cluster, every owned slice (`clustering.owned_refs`) of its
    members is replaced by the members' mean, position by position.
    """
    values = {}
    for group_id, members in clusters.items():
        group = analysis.group_by_id[group_id]
        if all(len(m) == 1 for m in members):
            continue
        for ref in owned_refs(analysis, group):
            variable = getattr(analysis.layer_at(ref.layer), ref.attr)
            value = values.get(id(variable))
            if value is None:
                value = np.asarray(variable.numpy(), dtype=np.float64).copy()
                values[id(variable)] = value
            moved = np.moveaxis(value, ref.axis, 0)  # a view: writes reach `value`
            table = ref.indices(group.size)  # (size, repeat * block)
            for cluster in members:
                if len(cluster) > 1:
                    rows = table[cluster]
                    moved[rows] = moved[rows].mean(axis=0, keepdims=True)
    return values


def _check_mergeable(analysis, clusters):
    """Raises if a clustered group passes through a layer whose handler forbids merging."""
    merged = {gid for gid, members in clusters.items() if any(len(m) > 1 for m in members)}
    if not merged:
        return
    for flat in analysis.nodes:
        handler = get_handler(flat.layer)
        problem = handler.merge_problem(flat.layer) if handler is not None else None
        if not problem:
            continue
        for key in flat.inputs:
            layout = analysis.layouts.get(key)
            for segment in layout.segments if layout is not None else ():
                group = analysis.group_of_space[segment.space]
                if group.id in merged:
                    raise ValueError(
                        f"the channels of group {group.id!r} cannot be merged exactly: {problem}"
                    )


def _rebuild_with(model, analysis, values):
    """A copy of `model` (same graph and names) whose variables in `values` hold those values."""

    def make_layer(path, layer):
        return recreate(layer, layer.get_config())

    def weights(path, old, new):
        return _sliced_values(old, {}, values)

    return Rebuild(analysis, make_layer, weights).run(model)


def hard_average(model, clusters):
    """A copy of `model` in which each cluster's channels are made identical.

    Every weight slice a clustered channel owns (`clustering.owned_refs`:
    producer kernels and biases, batch-norm parameters and moving
    statistics, depthwise kernels, a separable convolution's depthwise
    slices) is replaced, for each cluster, by the mean over the cluster's
    members; consumers are left alone. This is the model
    `merge_channels(model, clusters)` reproduces exactly.

    Args:
        model: a functional `keras.Model`; not modified.
        clusters: `{group_id: [[channel, ...], ...]}`, a partition of each
            listed group's channels (`tfkdp.pruning.clustering`).

    Returns:
        A new `keras.Model` with the same graph and layer names.

    Raises:
        ValueError: for bad clusters (`validate_clusters`), naming the group.

    Example:
        >>> from tfkdp import models
        >>> model = models.resnet_cifar(8, width=4)
        >>> averaged = hard_average(model, {"stem_conv": [[0, 1], [2], [3]]})
        >>> kernel = averaged.get_layer("stem_conv").kernel.numpy()
        >>> bool(np.allclose(kernel[..., 0], kernel[..., 1]))
        True

    Reference:
        Ding et al., "Centripetal SGD for Pruning Very Deep Convolutional
        Networks with Complicated Structure", CVPR 2019.
    """
    clusters = validate_clusters(model, clusters)
    analysis = analyze(model)
    return _rebuild_with(model, analysis, _averaged_values(analysis, clusters))


def merge_channels(model, clusters):
    """Removes channels by merging each cluster into its representative (channel addition).

    For every group in `clusters`, each cluster's owned slices are first
    averaged (as `hard_average` does); then the first channel of each
    cluster is kept and the others are removed; every weight that reads the
    group (a consumer kernel's input axis, dense rows after `Flatten`, the
    slices of each concatenated input) reads the representative for all
    members: their input slices are merged into the representative's by the
    consumer's handler (`LayerHandler.merge_input`, a sum for linear
    layers). The result computes what `hard_average(model, clusters)`
    computes, through batch norms, element-wise activations, residual adds
    (coupled groups), concatenations, `Flatten → Dense` and depthwise
    convolutions; when the members already compute the same channel (after
    centripetal training) that is what `model` computes. Clusters of one
    channel each make it `strip_channels` of the kept channels.

    Args:
        model: a functional `keras.Model`; not modified.
        clusters: `{group_id: [[channel, ...], ...]}`, a partition of each
            listed group's channels; the smallest channel of a cluster is kept.

    Returns:
        A new, smaller `keras.Model`.

    Raises:
        ValueError: if a group is unknown or unprunable, its clusters do not
            partition its channels, or a layer on the group's path cannot
            merge (`LayerHandler.merge_problem`).

    Example:
        >>> from tfkdp import models
        >>> model = models.resnet_cifar(8, width=4)
        >>> merged = merge_channels(model, {"stage1_block1_conv1": [[0, 1], [2], [3]]})
        >>> merged.get_layer("stage1_block1_conv1").filters
        3

    Reference:
        Ding et al., "Centripetal SGD for Pruning Very Deep Convolutional
        Networks with Complicated Structure", CVPR 2019 (channel merging);
        Niu et al., "Pruning-and-distillation: One-stage joint compression
        framework for CNNs via clustering", Image and Vision Computing 2023.
    """
    clusters = validate_clusters(model, clusters)
    analysis = analyze(model)
    _check_mergeable(analysis, clusters)
    values = _averaged_values(analysis, clusters)
    for group_id, members in clusters.items():
        group = analysis.group_by_id[group_id]
        if all(len(m) == 1 for m in members):
            continue
        for ref in group.in_params:
            layer = analysis.layer_at(ref.layer)
            handler = get_handler(layer)
            if handler.merge_owned(layer, ref.attr):
                continue  # averaged above: the representative's slice stands for all
            variable = getattr(layer, ref.attr)
            value = values.get(id(variable))
            if value is None:
                value = np.asarray(variable.numpy(), dtype=np.float64).copy()
            table = ref.indices(group.size)  # weight indices per channel
            # Position j of every member is merged into position j of the representative.
            columns = [list(col) for m in members if len(m) > 1 for col in table[m].T]
            values[id(variable)] = handler.merge_input(layer, ref.attr, value, ref.axis, columns)
    return _strip(model, cluster_plan(clusters), values)

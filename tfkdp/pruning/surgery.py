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
from tfkdp.pruning.handlers import get_handler
from tfkdp.pruning.plan import PruningPlan
from tfkdp.pruning.rebuild import (
    Rebuild,
    as_plan,
    first_nodes,
    masks_by_variable,
    old_values,
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
        return old_values(old, weight_masks)

    return Rebuild(analysis, make_layer, weights, tensor_keep).run(model)



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


def _check_clusters(analysis, clusters):
    """{group_id: list of index arrays, representative first}, validated."""
    if not isinstance(clusters, dict):
        raise ValueError(
            f"clusters must be a dict {{group_id: [[channel, ...], ...]}}; received {clusters!r}"
        )
    result = {}
    for group_id, members in clusters.items():
        group = analysis.group_by_id.get(group_id)
        if group is None:
            raise ValueError(
                f"unknown group id {group_id!r}; prunable groups are "
                f"{[g.id for g in analysis.groups if g.prunable]}"
            )
        if not group.prunable:
            raise ValueError(f"group {group_id!r} is not prunable: {group.reason}")
        seen = []
        lists = []
        for cluster in members:
            indices = [int(i) for i in cluster]
            if not indices:
                raise ValueError(f"group {group_id!r} has an empty cluster")
            seen.extend(indices)
            lists.append(indices)
        if sorted(seen) != list(range(group.size)):
            raise ValueError(
                f"the clusters of group {group_id!r} must partition its {group.size} channels "
                f"(each channel in exactly one cluster); received {members!r}"
            )
        result[group_id] = lists
    return result


def hard_average(model, clusters):
    """A copy of `model` in which each cluster's channels are made identical.

    Every weight slice that *produces* a group's channels (kernels, biases,
    batch-norm parameters and statistics) is replaced, for each cluster, by
    the mean over the cluster's members; consumers are left alone. This is
    the model `merge_channels(model, clusters)` reproduces exactly.

    Args:
        model: a functional `keras.Model`; not modified.
        clusters: `{group_id: [[channel, ...], ...]}`, a partition of each
            listed group's channels; the first member of a cluster is its
            representative.

    Returns:
        A new `keras.Model` with the same graph and layer names.

    Reference:
        Ding et al., "Centripetal SGD for Pruning Very Deep Convolutional
        Networks with Complicated Structure", CVPR 2019.
    """
    analysis = analyze(model)
    clusters = _check_clusters(analysis, clusters)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for group_id, members in clusters.items():
        group = analysis.group_by_id[group_id]
        for ref in group.out_params:
            variable = getattr(_layer(clone, ref.layer), ref.attr)
            value = np.moveaxis(np.asarray(variable.numpy(), dtype=np.float64), ref.axis, 0)
            table = ref.indices(group.size)  # (size, repeat, block)
            for indices in members:
                rows = table[indices]  # (members, repeat, block)
                value[rows] = value[rows].mean(axis=0, keepdims=True)
            variable.assign(np.moveaxis(value, 0, ref.axis).astype(variable.dtype))
    return clone


def _layer(model, path):
    from tfkdp.pruning.analysis import get_layer

    return get_layer(model, path)


def merge_channels(model, clusters):
    """Removes channels by merging each cluster into its representative.

    For every group in `clusters`, each cluster's producer slices are first
    averaged (`hard_average`); then the first channel of each cluster is kept
    and the others are removed; every weight that reads the group (a
    consumer kernel's input axis, dense rows after `Flatten`) reads the
    representative for all members: their input slices are merged into the
    representative's by the consumer's handler (`LayerHandler.merge_input`,
    a sum for linear layers). The result computes exactly what
    `hard_average(model, clusters)` computes; when the members of each
    cluster already compute the same channel (after clustering training),
    that is what `model` computes.

    Args:
        model: a functional `keras.Model`; not modified.
        clusters: `{group_id: [[channel, ...], ...]}`, a partition of each
            listed group's channels; the first member of a cluster is kept.

    Returns:
        A new, smaller `keras.Model`.

    Raises:
        ValueError: if a group is unknown or unprunable, or its clusters do
            not partition its channels.

    Example:
        >>> from tfkdp import models
        >>> model = models.resnet_cifar(8, width=4)
        >>> merged = merge_channels(model, {"stage1_block1_conv1": [[0, 1], [2], [3]]})
        >>> merged.get_layer("stage1_block1_conv1").filters
        3

    Reference:
        Ding et al., "Centripetal SGD for Pruning Very Deep Convolutional
        Networks with Complicated Structure", CVPR 2019 (channel merging).
    """
    averaged = hard_average(model, clusters)
    analysis = analyze(averaged)
    clusters = _check_clusters(analysis, clusters)
    merged = {}  # id(variable) -> merged value
    for group_id, members in clusters.items():
        group = analysis.group_by_id[group_id]
        for ref in group.in_params:
            layer = analysis.layer_at(ref.layer)
            variable = getattr(layer, ref.attr)
            value = merged.get(id(variable))
            if value is None:
                value = np.asarray(variable.numpy(), dtype=np.float64)
            table = ref.indices(group.size).reshape(group.size, -1)  # weight indices per channel
            # Position j of every member is merged into position j of the representative.
            index_sets = [table[m].T for m in members if len(m) > 1]
            columns = [cols for sets in index_sets for cols in sets]
            merged[id(variable)] = get_handler(layer).merge_input(
                layer, ref.attr, value, ref.axis, columns
            )
    plan = PruningPlan({gid: sorted(m[0] for m in members) for gid, members in clusters.items()})
    source = _with_values(averaged, merged) if merged else averaged
    return strip_channels(source, plan)


def _with_values(model, values):
    """A copy of `model` whose variables listed in `values` ({id: array}) hold those values."""
    by_position = {}
    for index, variable in enumerate(model.weights):
        if id(variable) in values:
            by_position[index] = values[id(variable)]
    clone = keras.models.clone_model(model)
    weights = model.get_weights()
    for index, value in by_position.items():
        weights[index] = value.astype(weights[index].dtype)
    clone.set_weights(weights)
    return clone

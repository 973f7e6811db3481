"""Model surgery: remove pruned channels for real, fold batch norm.

`strip_channels(model, plan)` rebuilds a functional model with every weight
sliced along every axis a pruned channel touches (producer kernels and
biases, batch-norm parameters and moving statistics, depthwise kernels,
consumer kernels, dense rows after `Flatten`, concatenation offsets), using
the channel groups of `tfkdp.graph`. The result is a new, smaller model that
computes what `tfkdp.masking.apply_plan(model, plan)` computes; the input
model is never modified. How a layer's constructor arguments change
(`filters`, `units`, a `Reshape` target) comes from the same per-class
registry as the analysis (`tfkdp.graph.register_layer`,
`LayerHandler.strip_config`).

`plan_macs` and `plan_params` give the MAC and parameter counts of the
stripped model without building it (for budget searches), and
`fold_batchnorm(model)` folds inference-mode batch normalisation into the
preceding convolution or dense layer for deployment.
"""

import math

import keras
import numpy as np

from tfkdp import graph, metrics
from tfkdp.plan import PruningPlan

__all__ = ["strip_channels", "fold_batchnorm", "plan_macs", "plan_params"]


# ---------------------------------------------------------------------------
# Generic rebuild
# ---------------------------------------------------------------------------


class _Rebuild:
    """Re-creates a functional model layer by layer, following its graph.

    Args:
        analysis: the `graph._Analysis` of the model.
        make_layer: `fn(path, layer) -> new layer` for every leaf layer/op.
        weights: `fn(path, old_layer, new_layer)` returning the new layer's
            weight values (a list in `weights` order, a `{weight name: value}`
            dict, or None to copy the old values); None copies everything.
        tensor_keep: `fn(flat_key) -> boolean keep mask or None`, used for
            the input shapes of nested models.
        bypass: paths of single-input layers whose output is replaced by
            their input (folded batch norms).
    """

    def __init__(self, analysis, make_layer, weights=None, tensor_keep=None, bypass=()):
        self.analysis = analysis
        self.make_layer = make_layer
        self.weights = weights
        self.tensor_keep = tensor_keep or (lambda key: None)
        self.bypass = set(bypass)
        self.created = {}
        self.pairs = []

    def run(self, model):
        new_model = self._model(model, "", "")
        for path, old, new in self.pairs:
            _assign(path, old, new, self.weights(path, old, new) if self.weights else None)
        return new_model

    def _layer(self, op, path):
        if path not in self.created:
            if graph._is_nested_model(op):
                new = self._model(op, f"{path}/", self.analysis.first_tag[path])
            else:
                new = self.make_layer(path, op)
                if isinstance(op, keras.layers.Layer) and op.weights:
                    self.pairs.append((path, op, new))
            self.created[path] = new
        return self.created[path]

    def _input(self, tensor, tag):
        layer = tensor._keras_history.operation
        shape = list(tensor.shape)
        keep = self.tensor_keep(self.analysis.key(tag, tensor))
        if keep is not None:
            shape[-1] = int(np.sum(keep))
        return keras.Input(
            batch_shape=tuple(shape), dtype=tensor.dtype, sparse=tensor.sparse, name=layer.name
        )

    def _model(self, model, prefix, tag):
        source = graph._graph_of(model)
        if isinstance(model, keras.Sequential):
            layers = []
            for depth in sorted(source._nodes_by_depth, reverse=True):
                for node in source._nodes_by_depth[depth]:
                    path = f"{prefix}{node.operation.name}"
                    if not node.is_input and path not in self.bypass:
                        layers.append(self._layer(node.operation, path))
            first = self._input(source.inputs[0], tag)
            new = keras.Sequential([first._keras_history.operation, *layers], name=model.name)
            if not model.trainable:
                new.trainable = False
            return new
        tensors = {}
        for tensor in source.inputs:
            tensors[id(tensor)] = self._input(tensor, tag)
        for depth in sorted(source._nodes_by_depth, reverse=True):
            for node in source._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                op = node.operation
                path = f"{prefix}{op.name}"
                if path in self.bypass:
                    tensors[id(node.outputs[0])] = tensors[id(node.input_tensors[0])]
                    continue
                args, kwargs = node.arguments.fill_in(tensors)
                outputs = self._layer(op, path)(*args, **kwargs)
                for old, new in zip(node.outputs, keras.tree.flatten(outputs), strict=False):
                    tensors[id(old)] = new
        inputs = keras.tree.map_structure(lambda t: tensors[id(t)], source._inputs_struct)
        outputs = keras.tree.map_structure(lambda t: tensors[id(t)], source._outputs_struct)
        new = keras.Model(inputs, outputs, name=model.name)
        if not model.trainable:
            new.trainable = False
        return new


def _assign(path, old, new, values):
    """Sets `new`'s weights from `values`: a list in `weights` order, a {name: array}, or None
    (copy `old`'s values)."""
    new_weights = list(new.weights)
    if values is None:
        values = [w.numpy() for w in old.weights]
    if isinstance(values, list):
        if len(values) != len(new_weights):
            raise ValueError(
                f"Rebuilt layer '{path}' has {len(new_weights)} weights; the original has "
                f"{len(values)}"
            )
    else:
        names = [w.name for w in new_weights]
        missing = [n for n in names if n not in values]
        if missing or len(set(names)) != len(names):
            raise ValueError(
                f"No value for weights {missing} of rebuilt layer '{path}' (have {sorted(values)})"
            )
        values = [values[n] for n in names]
    for variable, value in zip(new_weights, values, strict=False):
        value = np.asarray(value)
        if tuple(variable.shape) != value.shape:
            raise ValueError(
                f"Weight '{variable.name}' of rebuilt layer '{path}' has shape "
                f"{tuple(variable.shape)}; the sliced value has shape {value.shape}. The layer's "
                "handler (tfkdp.graph.register_layer) does not describe it correctly."
            )
        variable.assign(value.astype(variable.dtype))
    if hasattr(new, "finalize_state"):
        # Preprocessing layers (Normalization) cache tensors derived from
        # their weights; Keras refreshes them the same way after loading.
        new.finalize_state()


def _old_values(layer, weight_masks):
    """Values of `layer.weights` with `weight_masks` ({id: {axis: keep}}) applied."""
    values = []
    for variable in layer.weights:
        value = variable.numpy()
        for axis, keep in sorted(weight_masks.get(id(variable), {}).items()):
            value = np.compress(keep, value, axis=axis)
        values.append(value)
    return values


def _masks_by_variable(analysis, pruned):
    result = {}
    for (path, attr), axes in analysis.weight_keep(pruned).items():
        result[id(getattr(analysis.layer_at(path), attr))] = axes
    return result


def _first_nodes(analysis):
    first = {}
    for flat in analysis.nodes:
        first.setdefault(flat.path, flat)
    return first


def _recreate(layer, config):
    if type(layer) is keras.layers.Lambda:
        # Rebuild from the live function: deserialising a lambda from its
        # config is refused by Keras safe mode (and loses closures).
        return keras.layers.Lambda(
            layer.function, output_shape=layer._output_shape, mask=layer.mask,
            arguments=layer.arguments, name=layer.name, dtype=layer.dtype_policy,
        )  # fmt: skip
    try:
        return type(layer).from_config(config)
    except Exception as error:  # noqa: BLE001 - re-raised with the layer named
        raise ValueError(
            f"Could not re-create layer '{layer.name}' ({type(layer).__name__}) from its config: "
            f"{error}. Layers must implement get_config()/from_config() to be rebuilt."
        ) from error


def _as_plan(model, plan):
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan(plan)
    analysis = graph._analyze(model)
    plan.validate(analysis.groups)
    return analysis, plan


def _unmask_config(layer, config):
    """Removes tfkdp channel masks from a layer config (keeps user constraints)."""
    from tfkdp.masking import unwrap_mask  # masking imports this module

    for key, value in list(config.items()):
        if key.endswith("_constraint") and value is not None:
            config[key] = unwrap_mask(keras.constraints.get(value))
    return config


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


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
        `tfkdp.masking.apply_plan(model, plan)`.

    Raises:
        ValueError: if the plan does not fit the model (see
            `PruningPlan.validate`) or a layer cannot be re-created.

    Example:
        >>> from tfkdp import models
        >>> from tfkdp.plan import PruningPlan
        >>> model = models.resnet_cifar(8, width=8)
        >>> small = strip_channels(model, PruningPlan({"stage1_block1_conv1": range(4)}))
        >>> small.get_layer("stage1_block1_conv1").filters
        4
    """
    analysis, plan = _as_plan(model, plan)
    pruned = analysis.pruned(plan)
    weight_masks = _masks_by_variable(analysis, pruned)
    first = _first_nodes(analysis)
    keep_cache = {}

    def tensor_keep(key):
        if key not in keep_cache:
            keep_cache[key] = analysis.tensor_keep(key, pruned) if pruned else None
        return keep_cache[key]

    def make_layer(path, layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Layer):
            config = _unmask_config(layer, config)
        handler = graph.get_handler(layer)
        if handler is not None and pruned:
            flat = first[path]
            in_keep = [tensor_keep(k) for k in flat.inputs]
            out_keep = [tensor_keep(k) for k in flat.outputs]
            config = handler.strip_config(layer, config, in_keep, out_keep)
        return _recreate(layer, config)

    def weights(path, old, new):
        return _old_values(old, weight_masks)

    return _Rebuild(analysis, make_layer, weights, tensor_keep).run(model)


def _kept_shape(analysis, key, pruned):
    shape = [1 if d is None else int(d) for d in analysis.shapes[key]]
    keep = analysis.tensor_keep(key, pruned) if pruned else None
    if keep is not None:
        shape[-1] = int(np.sum(keep))
    return tuple(shape)


def plan_macs(model, plan):
    """MACs of `strip_channels(model, plan)` without building it.

    Equal to `tfkdp.count_macs(strip_channels(model, plan))` (same counting
    rules, see `tfkdp.metrics`), at a small fraction of the cost: use it in
    budget searches.

    Args:
        model: a functional `keras.Model`.
        plan: a `PruningPlan` (or mapping).

    Returns:
        The MAC count of one forward pass at batch size 1, as an `int`.

    Raises:
        ValueError: if the plan does not fit the model.
    """
    analysis, plan = _as_plan(model, plan)
    pruned = analysis.pruned(plan)
    total = 0
    for flat in analysis.nodes:
        rule = next((fn for cls, fn in metrics._MAC_RULES if isinstance(flat.layer, cls)), None)
        if rule is None:
            continue
        in_shape = _kept_shape(analysis, flat.inputs[0], pruned)
        out_shape = _kept_shape(analysis, flat.outputs[0], pruned)
        total += rule(flat.layer, in_shape, out_shape)
    return int(total)


def plan_params(model, plan):
    """Parameter count of `strip_channels(model, plan)` without building it.

    Counts every weight, batch-norm moving statistics included, like
    `tfkdp.count_params`.

    Args:
        model: a functional `keras.Model`.
        plan: a `PruningPlan` (or mapping).

    Returns:
        The parameter count as an `int`.
    """
    analysis, plan = _as_plan(model, plan)
    masks = _masks_by_variable(analysis, analysis.pruned(plan))
    total, seen = 0, set()
    for variable in model.weights:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        shape = list(variable.shape)
        for axis, keep in masks.get(id(variable), {}).items():
            shape[axis] = int(np.sum(keep))
        total += math.prod(shape)
    return int(total)


# -- batch-norm folding -----------------------------------------------------

# kernel attribute and how the output channels sit on it: "last" (..., out),
# "transpose" (..., out, in), "depthwise" (..., in, multiplier).
_FOLDABLE = {
    keras.layers.Conv1D: ("kernel", "last"),
    keras.layers.Conv2D: ("kernel", "last"),
    keras.layers.Conv3D: ("kernel", "last"),
    keras.layers.Dense: ("kernel", "last"),
    keras.layers.Conv1DTranspose: ("kernel", "transpose"),
    keras.layers.Conv2DTranspose: ("kernel", "transpose"),
    keras.layers.Conv3DTranspose: ("kernel", "transpose"),
    keras.layers.DepthwiseConv1D: ("kernel", "depthwise"),
    keras.layers.DepthwiseConv2D: ("kernel", "depthwise"),
    keras.layers.SeparableConv1D: ("pointwise_kernel", "last"),
    keras.layers.SeparableConv2D: ("pointwise_kernel", "last"),
}


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
        if type(producer.layer) not in _FOLDABLE or producer.path in pairs:
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


def _folded_values(layer, bn):
    attr, kind = _FOLDABLE[type(layer)]
    variance = bn.moving_variance.numpy().astype(np.float64)
    scale = 1.0 / np.sqrt(variance + bn.epsilon)
    if bn.scale:
        scale = scale * bn.gamma.numpy().astype(np.float64)
    shift = -bn.moving_mean.numpy().astype(np.float64) * scale
    if bn.center:
        shift = shift + bn.beta.numpy().astype(np.float64)
    values = {w.name: w.numpy() for w in layer.weights}
    kernel = getattr(layer, attr).numpy().astype(np.float64)
    if kind == "last":
        kernel = kernel * scale
    elif kind == "transpose":
        kernel = kernel * scale[:, None]
    else:
        kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    bias = (
        layer.bias.numpy().astype(np.float64) if getattr(layer, "bias", None) is not None else 0.0
    )
    values[getattr(layer, attr).name] = kernel
    values["bias"] = bias * scale + shift
    return values


def fold_batchnorm(model):
    """Folds inference-mode batch normalisation into the preceding layer.

    A `BatchNormalization` is folded into the `Conv*`, `Conv*Transpose`,
    `DepthwiseConv*`, `SeparableConv*` or `Dense` layer that feeds it when
    that layer has a linear activation, is called once, and feeds nothing
    else; the layer gets a bias, the batch norm disappears. Other batch norms
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
    analysis = graph._analyze(model)
    pairs = _foldable_pairs(analysis)
    bn_of = {prod: bn for prod, bn in pairs.items()}

    def make_layer(path, layer):
        config = layer.get_config()
        if path in bn_of:
            config["use_bias"] = True
        return _recreate(layer, config)

    def weights(path, old, new):
        if path in bn_of:
            return _folded_values(old, analysis.layer_at(bn_of[path]))
        return None

    return _Rebuild(analysis, make_layer, weights, bypass=pairs.values()).run(model)

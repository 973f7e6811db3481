"""The rebuild engine: re-create a functional model layer by layer, new weights in.

`apply_plan` (masks), `strip_channels`, `merge_channels` and `fold_batchnorm`
are all one rebuild of the same graph, differing only in how each layer's
config changes and which weight values it receives. Nested functional and
sequential models are re-created in the order of
`tfkdp.pruning.walker.ordered_nodes`; shared layers are created once.
Mask state (`tfkdp.pruning.masks`) is not a parameter: the engine copies and
slices parameters only, and a rebuilt layer's masks come from its config.
"""

import keras
import numpy as np

from tfkdp.pruning.analysis import analyze
from tfkdp.pruning.masks import is_mask_variable, unwrap_mask
from tfkdp.pruning.plan import PruningPlan
from tfkdp.pruning.walker import graph_of, is_nested_model, ordered_nodes

__all__ = ["Rebuild", "parameters", "recreate", "assign", "as_plan"]


def parameters(layer):
    """`layer.weights` without mask state (`is_mask_variable`)."""
    return [w for w in layer.weights if not is_mask_variable(w)]


class Rebuild:
    """Re-creates a functional model layer by layer, following its graph.

    Args:
        analysis: the channel analysis of the model (`analysis.analyze`).
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
            assign(path, old, new, self.weights(path, old, new) if self.weights else None)
        return new_model

    def _layer(self, op, path):
        if path not in self.created:
            if is_nested_model(op):
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
        source = graph_of(model)
        nodes = [n for n in ordered_nodes(source) if not n.is_input]
        if isinstance(model, keras.Sequential):
            layers = [
                self._layer(node.operation, f"{prefix}{node.operation.name}")
                for node in nodes if f"{prefix}{node.operation.name}" not in self.bypass
            ]  # fmt: skip
            first = self._input(source.inputs[0], tag)
            new = keras.Sequential([first._keras_history.operation, *layers], name=model.name)
            if not model.trainable:
                new.trainable = False
            return new
        tensors = {}
        for tensor in source.inputs:
            tensors[id(tensor)] = self._input(tensor, tag)
        for node in nodes:
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


def assign(path, old, new, values):
    """Sets `new`'s weights from `values`: a list in `weights` order, a {name: array}, or None
    (copy `old`'s values)."""
    new_weights = parameters(new)
    if values is None:
        values = [w.numpy() for w in parameters(old)]
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
                "handler (tfkdp.register_layer) does not describe it correctly."
            )
        variable.assign(value.astype(variable.dtype))
    if hasattr(new, "finalize_state"):
        # Preprocessing layers (Normalization) cache tensors derived from
        # their weights; Keras refreshes them the same way after loading.
        new.finalize_state()


def old_values(layer, weight_masks):
    """Values of `layer.weights` with `weight_masks` ({id: {axis: keep}}) applied."""
    values = []
    for variable in parameters(layer):
        value = variable.numpy()
        for axis, keep in sorted(weight_masks.get(id(variable), {}).items()):
            value = np.compress(keep, value, axis=axis)
        values.append(value)
    return values


def masks_by_variable(analysis, pruned):
    result = {}
    for (path, attr), axes in analysis.weight_keep(pruned).items():
        result[id(getattr(analysis.layer_at(path), attr))] = axes
    return result


def first_nodes(analysis):
    first = {}
    for flat in analysis.nodes:
        first.setdefault(flat.path, flat)
    return first


def recreate(layer, config):
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


def as_plan(model, plan):
    if not isinstance(plan, PruningPlan):
        plan = PruningPlan(plan)
    analysis = analyze(model)
    plan.validate(analysis.groups)
    return analysis, plan


def unmask_config(layer, config):
    """Removes tfkdp channel masks from a layer config (keeps user constraints)."""
    for key, value in list(config.items()):
        if key.endswith("_constraint") and value is not None:
            config[key] = unwrap_mask(keras.constraints.get(value))
    return config

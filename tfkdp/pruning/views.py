"""Shared-weight views: several channel-masked models over one set of kernels.

`SharedViews(model, count)` re-traces a functional model `count` times. Every
view calls the *same* convolution, dense and depthwise layer objects (so the
kernels are shared: a change made through one view is seen by all), while
each view has

- its own copies of the normalisation layers (batch norm: its own γ, β and
  moving statistics) and of the classifier (the layer producing the model's
  output), initialised from the model's;
- its own per-channel scores γ (trainable) and binary masks M (non-trainable:
  masks as state) for every prunable channel group (`channel_groups`), held
  by a `ViewState` layer.

View 0 uses the model's own normalisation and classifier layers, so after
training the model itself holds view 0's weights.

A view multiplies the channels of each group by its mask at two kinds of
points:

- the output of each *producer* of the group (the convolution or dense layer
  creating its channels) by a straight-through gate
  `Y · (M + γ − stop_gradient(γ))`: the forward value is `Y · M` and
  `∂L/∂γₙ = Σ ∂L/∂Zₙ · Yₙ` (summed over batch, positions and the group's
  producers), the saliency of the cascade paper;
- the input of each layer that reads the group's channels (consumer slices),
  by the mask alone, so a pruned channel that is not zero (a batch norm's β,
  a sigmoid) never reaches a kept output.

Hence view `i`'s output equals `apply_plan(view_model(i), view_plan(i))`'s,
which `strip_channels` reduces exactly.

Only flat functional (or built sequential) models are supported: a nested
sub-model would need its own views of its layers.

Reference:
    Miles & Mikolajczyk, "Cascaded channel pruning using hierarchical
    self-distillation", BMVC 2020 (shared kernels, per-model masks, batch
    norms and classifiers; straight-through score gradient).
"""

import keras
import numpy as np
from keras import ops

from tfkdp.pruning.analysis import analyze
from tfkdp.pruning.plan import PruningPlan
from tfkdp.pruning.records import ParamRef
from tfkdp.pruning.walker import graph_of, is_nested_model, ordered_nodes

__all__ = ["SharedViews", "ViewState", "ChannelGate", "is_per_view"]

_NORMALIZATION = (
    keras.layers.BatchNormalization, keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)  # fmt: skip


def is_per_view(layer, output_layers):
    """True for layers every view owns a copy of: normalisations and the classifier."""
    return isinstance(layer, _NORMALIZATION) or (layer in output_layers and bool(layer.weights))


class ViewState(keras.layers.Layer):
    """One view's scores γ (trainable) and masks M (non-trainable) per prunable group.

    Args:
        sizes: `{group id: number of channels}` of the prunable groups.
        scores: optional `{group id: initial scores}` (default: ones).

    Attributes:
        group_ids: the group ids, in order.
        scores, masks: lists of variables, one per group (shape `(size,)`).
    """

    def __init__(self, sizes, scores=None, **kwargs):
        super().__init__(**kwargs)
        self.group_ids = list(sizes)
        self.scores = []
        self.masks = []
        for i, gid in enumerate(self.group_ids):
            initial = np.ones(sizes[gid], np.float32) if scores is None else scores[gid]
            self.scores.append(self.add_weight(
                shape=(sizes[gid],), initializer=keras.initializers.Constant(
                    np.asarray(initial, np.float32)), trainable=True, name=f"score_{i}",
            ))  # fmt: skip
            self.masks.append(self.add_weight(
                shape=(sizes[gid],), initializer="ones", trainable=False, name=f"mask_{i}",
                aggregation="only_first_replica",
            ))  # fmt: skip
        self.built = True

    def gate_values(self, straight_through):
        """The masks (with the straight-through score term) concatenated, then a 1."""
        parts = []
        for score, mask in zip(self.scores, self.masks, strict=True):
            value = ops.convert_to_tensor(mask)
            if straight_through:
                value = value + score - ops.stop_gradient(score)
            parts.append(value)
        parts.append(ops.ones((1,), dtype="float32"))
        return ops.concatenate(parts, axis=0)

    def set_plan(self, plan):
        """Sets the masks to a `PruningPlan` (groups it does not name keep everything)."""
        for gid, mask in zip(self.group_ids, self.masks, strict=True):
            value = np.zeros(mask.shape, np.float32)
            keep = plan[gid] if gid in plan else range(mask.shape[0])
            value[list(keep)] = 1.0
            mask.assign(value)

    def plan(self):
        """The `PruningPlan` of the current masks."""
        keep = {}
        for gid, mask in zip(self.group_ids, self.masks, strict=True):
            kept = np.flatnonzero(keras.ops.convert_to_numpy(mask) > 0.5)
            if kept.size < mask.shape[0]:
                keep[gid] = kept.tolist()
        return PruningPlan(keep)

    def score_values(self):
        """`{group id: float64 scores}`."""
        return {
            gid: keras.ops.convert_to_numpy(s).astype(np.float64)
            for gid, s in zip(self.group_ids, self.scores, strict=True)
        }


class ChannelGate(keras.layers.Layer):
    """Multiplies a tensor's channels by its view's masks (see the module docstring).

    Args:
        state: the view's `ViewState`.
        index: int array, for each position of the channel axis, the index
            into `state.gate_values()` (the last index means "not masked").
        straight_through: add the straight-through score gradient.
    """

    def __init__(self, state, index, straight_through, **kwargs):
        super().__init__(**kwargs)
        # Not tracked as a sub-layer: the state's variables belong to the view's owner.
        object.__setattr__(self, "_state", state)
        self.index = np.asarray(index, np.int32)
        self.straight_through = bool(straight_through)
        self.built = True

    def call(self, x):
        gate = ops.take(self._state.gate_values(self.straight_through), self.index, axis=0)
        return x * ops.cast(gate, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


class SharedViews:
    """`count` masked views of one functional model sharing its kernels.

    Args:
        model: a flat functional (or built sequential) `keras.Model`; its
            kernel layers are shared by all views, its normalisation layers
            and classifier belong to view 0.
        count: number of views (>= 1).
        scores: optional `{group id: scores}` every view's γ starts from.

    Attributes:
        model: the model.
        groups: its prunable `ChannelGroup`s.
        views: the views (functional `keras.Model`s), view 0 first.
        states: their `ViewState`s.

    Raises:
        ValueError: for a nested model, a model with no prunable group, or a
            bad `count`.

    Example:
        >>> from tfkdp import models
        >>> views = SharedViews(models.resnet_cifar(8, width=4), count=2)
        >>> views.views[0].get_layer("stem_conv") is views.views[1].get_layer("stem_conv")
        True
    """

    def __init__(self, model, count, scores=None):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1; received count={count!r}")
        graph = graph_of(model)
        if graph is None:
            raise ValueError(
                f"shared views need a functional or built Sequential keras.Model; received "
                f"{type(model).__name__}"
            )
        nested = [n.operation.name for n in ordered_nodes(graph) if is_nested_model(n.operation)]
        if nested:
            raise ValueError(
                f"shared views need a flat functional model; {model.name!r} calls the nested "
                f"model(s) {nested}: rebuild it without nesting"
            )
        self.model = model
        self._analysis = analyze(model)
        self.groups = [g for g in self._analysis.groups if g.prunable]
        if not self.groups:
            raise ValueError(f"model {model.name!r} has no prunable channel group")
        self._offsets = {}
        total = 0
        for group in self.groups:
            self._offsets[group.id] = total
            total += group.size
        self._ones_index = total
        sizes = {g.id: g.size for g in self.groups}
        self.states = [ViewState(sizes, scores, name=f"view{i}_state") for i in range(count)]
        self._producers = {p for g in self.groups for p in g.producers}
        self._consumers = {ref.layer for g in self.groups for ref in g.in_params}
        self._index_cache = {}
        self._outputs = {n.operation for n in ordered_nodes(graph) if any(
            id(t) in {id(o) for o in graph.outputs} for t in n.outputs)}  # fmt: skip
        self.views = [self._trace(i) for i in range(count)]

    # -- building -----------------------------------------------------------------
    def _gate_index(self, key):
        """Positions of a tensor's channel axis → indices into the gate values, or None."""
        if key in self._index_cache:
            return self._index_cache[key]
        layout = self._analysis.layouts.get(key)
        index = None
        if layout is not None:
            index = np.full(layout.length, self._ones_index, np.int32)
            for seg in layout.segments:
                group = self._analysis.group_of_space[seg.space]
                if group.id not in self._offsets:
                    continue
                ref = ParamRef("", "", 0, seg.offset, seg.repeat, seg.stride, seg.block)
                table = ref.indices(group.size)
                for c in range(group.size):
                    index[table[c]] = self._offsets[group.id] + c
            if np.all(index == self._ones_index):
                index = None
        self._index_cache[key] = index
        return index

    def _trace(self, i):
        state = self.states[i]
        graph = graph_of(self.model)
        flat_by_node = {id(f.node): f for f in self._analysis.nodes}
        tensors = {}
        gated_inputs = {}
        inputs = []
        for tensor in graph.inputs:
            new = keras.Input(batch_shape=tuple(tensor.shape), dtype=tensor.dtype,
                              name=f"view{i}_{tensor._keras_history.operation.name}")  # fmt: skip
            tensors[id(tensor)] = new
            inputs.append(new)
        copies = {}
        for node in ordered_nodes(graph):
            if node.is_input:
                continue
            op = node.operation
            flat = flat_by_node[id(node)]
            local = dict(tensors)
            if flat.path in self._consumers:
                for tensor, key in zip(node.input_tensors, flat.inputs, strict=False):
                    index = self._gate_index(key)
                    if index is None:
                        continue
                    if (key, "in") not in gated_inputs:
                        gate = ChannelGate(
                            state, index, False, name=f"view{i}_in_{len(gated_inputs)}"
                        )
                        gated_inputs[(key, "in")] = gate(tensors[id(tensor)])
                    local[id(tensor)] = gated_inputs[(key, "in")]
            layer = op
            if i > 0 and isinstance(op, keras.layers.Layer) and is_per_view(op, self._outputs):
                if op not in copies:
                    config = op.get_config()
                    config["name"] = f"view{i}_{op.name}"
                    copies[op] = type(op).from_config(config)
                layer = copies[op]
            args, kwargs = node.arguments.fill_in(local)
            outputs = keras.tree.flatten(layer(*args, **kwargs))
            if flat.path in self._producers:
                for n, key in enumerate(flat.outputs):
                    index = self._gate_index(key)
                    if index is not None:
                        gate = ChannelGate(state, index, True, name=f"view{i}_out_{flat.path}_{n}")
                        outputs[n] = gate(outputs[n])
            for old, new in zip(node.outputs, outputs, strict=False):
                tensors[id(old)] = new
        outputs = keras.tree.map_structure(lambda t: tensors[id(t)], graph._outputs_struct)
        view = keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs, name=f"view{i}")
        for original, copy in copies.items():
            copy.set_weights(original.get_weights())
        return view

    # -- reading ------------------------------------------------------------------
    def per_view_layers(self, i):
        """`{original layer name: view i's layer}` of the layers view i owns."""
        view = self.views[i]
        result = {}
        for layer in self.model.layers:
            if is_per_view(layer, self._outputs):
                result[layer.name] = layer if i == 0 else view.get_layer(f"view{i}_{layer.name}")
        return result

    def view_model(self, i):
        """A standalone copy of the model with view i's weights (shared kernels, own BN/head)."""
        from tfkdp.train.clone import copy_model

        copy = copy_model(self.model, name=f"{self.model.name}_view{i}")
        for name, layer in self.per_view_layers(i).items():
            copy.get_layer(name).set_weights(layer.get_weights())
        return copy

    def view_plan(self, i):
        """View i's masks as a `PruningPlan`."""
        return self.states[i].plan()

    def masked_model(self, i):
        """`apply_plan(view_model(i), view_plan(i))`: equal to view i, as a plain masked model."""
        from tfkdp.pruning.masking import apply_plan

        return apply_plan(self.view_model(i), self.view_plan(i))

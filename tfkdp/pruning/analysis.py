"""Channel dependency analysis of functional Keras 3 models.

Structured pruning removes whole channels, and a channel rarely lives in one
layer: a residual `Add` ties the channels of every block in a stage, a
depthwise convolution passes its input channels through, a `Concatenate`
places several channel sets side by side, a `Flatten → Dense` spreads one
channel over many rows of the dense kernel. `channel_groups(model)` walks the
functional graph (nested functional and sequential sub-models included) and
returns the `ChannelGroup`s: the sets of channels that must be removed
together, with every weight slice that produces them (`out_params`) and every
weight slice that reads them (`in_params`).

How each layer type maps channels comes from a registry keyed by the exact
layer class (`register_layer`). A layer whose class is not registered is never
guessed at: every group it touches is marked unprunable, with a `reason` that
names the layer and its class. Subclasses of registered layers must be
registered too, since their `call` may differ from their parent's.

Conventions:
- Channels are the last axis of every tensor (`channels_last`); layers with
  `data_format="channels_first"` make the groups they touch unprunable.
- A `ParamRef` names one weight slice. Channel `c` of a group of size `size`
  owns, on axis `ref.axis` of the weight, the indices
  `ref.offset + k * stride + c * ref.block + j` for `k in range(ref.repeat)`
  and `j in range(ref.block)`, where `stride = ref.stride or size * ref.block`.
  A plain slice has `offset=0, repeat=1, block=1`; a group placed second in a
  `Concatenate` has `offset` equal to the first input's width; after
  `Flatten`, `repeat` is the number of spatial positions and `stride` the
  width of the flattened tensor's channel axis; after a depthwise convolution
  with `depth_multiplier=m`, `block=m`. `ParamRef.indices(size)` computes the
  index table.
- Masking (`tfkdp.masking`) zeroes the producer slices *and* the consumer
  slices of pruned channels, so a pruned channel that is not exactly zero
  (after an activation with f(0) != 0 such as sigmoid or softplus, a
  `Rescaling` offset, a `Normalization` mean) never reaches a kept output: the
  masked model computes exactly what the stripped model computes. Operations
  that mix channels (softmax over channels, `LayerNormalization` over
  channels, a `Reshape` that moves the channel axis) cannot be compensated
  that way and make their groups unprunable, as do model outputs and inputs.
"""

import collections
import dataclasses
import weakref

import numpy as np

from tfkdp.pruning import layers as _keras_layers  # noqa: F401 - registers Keras' layers
from tfkdp.pruning.handlers import class_name, get_handler, registry_version
from tfkdp.pruning.records import ChannelGroup, Layout, ParamRef, Segment
from tfkdp.pruning.walker import FlatGraph, graph_of

__all__ = ["LayerCall", "channel_groups", "get_layer", "get_weight", "channel_values"]


class _Space:
    __slots__ = ("creator", "producer", "size", "order", "reasons", "out_refs", "in_refs")

    def __init__(self, creator, producer, size, order):
        self.creator = creator
        self.producer = producer
        self.size = size
        self.order = order
        self.reasons = []
        self.out_refs = {}
        self.in_refs = {}



class LayerCall:
    """One call of a layer during the analysis; what a handler works with.

    Attributes:
        layer: the layer (or `keras.Operation`) being called.
        path: its path (`"outer/inner"` inside nested models).
        inputs: one `Layout` (or `None` when the channel axis is unknown) per
            input tensor of the call, in the order of `node.input_tensors`.
        input_shapes: shapes of the input tensors.
        output_shapes: shapes of the output tensors.
        node: the Keras `Node` of the call.
        arguments: positional arguments of the call, tensors included.
    """

    def __init__(self, analysis, flat_node, inputs):
        self._analysis = analysis
        self._flat = flat_node
        self.layer = flat_node.layer
        self.path = flat_node.path
        self.node = flat_node.node
        self.inputs = inputs
        self.input_shapes = [tuple(t.shape) for t in flat_node.node.input_tensors]
        self.output_shapes = [tuple(t.shape) for t in flat_node.node.outputs]
        self.arguments = flat_node.node.arguments.args

    # -- creating and combining layouts ----------------------------------
    def new_channels(self, index=0, size=None):
        """A new channel group for output `index` of this layer.

        The same group is returned on every call of a shared layer.

        Args:
            index: output index.
            size: number of channels; defaults to the output's last dimension.

        Returns:
            A `Layout`, or `None` if the size is unknown.
        """
        if size is None:
            size = self.output_shapes[index][-1] if self.output_shapes[index] else None
        if size is None:
            return None
        space = self._analysis._space_for(self.path, index, int(size), producer=True)
        return Layout((Segment(space, 0),), int(size))

    def tie(self, *layouts, reason=None):
        """Declares that the given layouts carry the same channels, index by index.

        Layouts of different structure (a concatenation tied to a single
        group) cannot be tied; their groups are marked unprunable instead.

        Returns:
            True if the layouts were tied.
        """
        return self._analysis._tie(layouts, self.path, reason)

    def block(self, layouts, reason):
        """Marks every group in `layouts` unprunable with `reason`."""
        for layout in layouts:
            self._analysis._block(layout, reason)

    def unprunable(self, reason):
        """Blocks every input and returns new unprunable outputs.

        The answer for a call the handler cannot map: nothing that touches it
        is pruned.

        Args:
            reason: why, naming the layer.

        Returns:
            One `Layout` (or `None`) per output.
        """
        self.block(self.inputs, reason)
        outputs = []
        for index, shape in enumerate(self.output_shapes):
            if not shape or shape[-1] is None:
                outputs.append(None)
                continue
            # Keyed by call: an unknown layer may return different widths per call.
            space = self._analysis._space_for(
                self.path, index, int(shape[-1]), producer=True, call=id(self.node)
            )
            self._analysis._spaces[space].reasons.append(reason)
            outputs.append(Layout((Segment(space, 0),), int(shape[-1])))
        return outputs

    def flatten(self, layout, positions):
        """Layout of `Flatten` applied to a tensor with `positions` spatial positions."""
        segments = tuple(
            dataclasses.replace(s, repeat=int(positions), stride=layout.length)
            for s in layout.segments
        )
        return Layout(segments, layout.length * int(positions))

    def concat(self, layouts):
        """Layout of the channel-axis concatenation of `layouts` (None if any is None)."""
        if any(layout is None for layout in layouts):
            return None
        segments, offset = [], 0
        for layout in layouts:
            segments.extend(
                dataclasses.replace(s, offset=s.offset + offset) for s in layout.segments
            )
            offset += layout.length
        return Layout(tuple(segments), offset)

    def multiply(self, layout, multiplier):
        """Layout after a depthwise convolution with `depth_multiplier=multiplier`."""
        m = int(multiplier)
        segments = tuple(
            dataclasses.replace(s, offset=s.offset * m, block=s.block * m, stride=s.stride * m)
            for s in layout.segments
        )
        return Layout(segments, layout.length * m)

    # -- weights ----------------------------------------------------------
    def produces(self, layout, attr, axis):
        """Records that weight `attr` (axis `axis`) produces/scales `layout`'s channels.

        Does nothing if the layer has no such weight (e.g. `bias` with
        `use_bias=False`) or `layout` is None.
        """
        self._analysis._add_refs(self, layout, attr, axis, out=True)

    def consumes(self, layout, attr, axis):
        """Records that weight `attr` (axis `axis`) reads `layout`'s channels."""
        self._analysis._add_refs(self, layout, attr, axis, out=False)



class _Analysis:
    """Result of walking one model: flat nodes, tensor layouts and groups."""

    def __init__(self, model):
        flat = FlatGraph(model)
        self.flat = flat
        self.nodes = flat.nodes
        self.shapes = flat.shapes
        self.producer_of = flat.producer_of
        self.consumers = flat.consumers
        self.output_keys = flat.output_keys
        self.first_tag = flat.first_tag
        self.input_keys = flat.input_keys
        self.top_outputs = flat.top_outputs
        self.key = flat.key
        self._spaces = []
        self._parent = []
        self._space_index = {}
        self._creations = collections.Counter()
        self.layouts = {}
        self._first_inputs = {}
        for key, name, shape in flat.inputs:
            size = shape[-1] if shape else None
            if size is not None:
                space = self._space_for(name, 0, int(size), producer=True)
                self._spaces[space].reasons.append(f"model input '{name}'")
                self.layouts[key] = Layout((Segment(space, 0),), int(size))
        self._propagate()
        for key in self.top_outputs:
            name = self._output_name(key)
            self._block(self.layouts.get(key), f"reaches model output '{name}'")
        self._build_groups()

    def _output_name(self, key):
        node = self.producer_of.get(key)
        return node.path if node is not None else "input"

    # -- spaces and union-find ---------------------------------------------
    def _space_for(self, path, index, size, producer, call=None):
        cache_key = (path, index) if call is None else (path, index, call)
        if cache_key in self._space_index:
            space = self._space_index[cache_key]
            if self._spaces[space].size != size:
                raise ValueError(
                    f"layer '{path}' output {index} has {size} channels on one call and "
                    f"{self._spaces[space].size} on another"
                )
            return space
        creator = path if index == 0 else f"{path}:{index}"
        self._creations[(path, index)] += 1
        if self._creations[(path, index)] > 1:
            creator = f"{creator}#{self._creations[(path, index)]}"
        space = len(self._spaces)
        self._spaces.append(_Space(creator, path if producer else None, size, space))
        self._parent.append(space)
        self._space_index[cache_key] = space
        return space

    def find(self, space):
        root = space
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[space] != root:
            self._parent[space], space = root, self._parent[space]
        return root

    def _union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The earliest space stays root so group ids follow graph order.
            if rb < ra:
                ra, rb = rb, ra
            self._parent[rb] = ra

    def _block(self, layout, reason):
        if layout is None:
            return
        for segment in layout.segments:
            self._spaces[segment.space].reasons.append(reason)

    def _tie(self, layouts, path, reason=None):
        layouts = [layout for layout in layouts if layout is not None]
        if len(layouts) < 2:
            return True
        sizes = [s.size for s in self._spaces]
        first = layouts[0]
        shape = [seg.shape_key(sizes) for seg in first.segments]
        for other in layouts[1:]:
            if (
                other.length != first.length
                or [seg.shape_key(sizes) for seg in other.segments] != shape
            ):
                why = reason or (
                    f"layer '{path}' ties channels of differently composed tensors "
                    "(e.g. a concatenation and a single group)"
                )
                for layout in layouts:
                    self._block(layout, why)
                return False
        for other in layouts[1:]:
            for a, b in zip(first.segments, other.segments, strict=False):
                self._union(a.space, b.space)
        return True

    def _add_refs(self, call, layout, attr, axis, out):
        if layout is None:
            return
        weight = getattr(call.layer, attr, None)
        if weight is None:
            return
        ndim = len(weight.shape)
        axis = int(axis) % ndim
        if weight.shape[axis] != layout.length:
            raise ValueError(
                f"handler {type(get_handler(call.layer)).__name__} maps weight '{attr}' axis "
                f"{axis} of layer '{call.path}' (shape {tuple(weight.shape)}) onto a tensor with "
                f"{layout.length} channels"
            )
        for seg in layout.segments:
            ref = ParamRef(call.path, attr, axis, seg.offset, seg.repeat, seg.stride, seg.block)
            target = self._spaces[seg.space].out_refs if out else self._spaces[seg.space].in_refs
            target[ref] = None

    # -- propagation ---------------------------------------------------------
    def _propagate(self):
        for flat in self.nodes:
            inputs = [self.layouts.get(k) for k in flat.inputs]
            call = LayerCall(self, flat, inputs)
            # A shared layer has one set of weights: all its calls must see
            # the same channel groups.
            if getattr(flat.layer, "weights", None):
                first = self._first_inputs.setdefault(flat.path, inputs)
                if first is not inputs:
                    for a, b in zip(first, inputs, strict=False):
                        self._tie(
                            [a, b], flat.path,
                            f"shared layer '{flat.path}' is called on differently composed tensors",
                        )  # fmt: skip
            handler = get_handler(flat.layer)
            if handler is None:
                outputs = call.unprunable(
                    f"layer '{flat.path}' of unregistered class {class_name(flat.layer)} "
                    "(register it with tfkdp.register_layer)"
                )
            else:
                outputs = handler.propagate(call)
            outputs = list(outputs)
            if len(outputs) != len(flat.outputs):
                raise ValueError(
                    f"handler {type(handler).__name__} returned {len(outputs)} layouts for layer "
                    f"'{flat.path}', which has {len(flat.outputs)} outputs"
                )
            for key, layout in zip(flat.outputs, outputs, strict=False):
                shape = self.shapes[key]
                if layout is not None and (not shape or shape[-1] != layout.length):
                    raise ValueError(
                        f"handler {type(handler).__name__} gave layer '{flat.path}' an output "
                        f"layout of {layout.length} channels; the tensor has shape {shape}"
                    )
                self.layouts[key] = layout

    def _build_groups(self):
        members = collections.defaultdict(list)
        for index in range(len(self._spaces)):
            members[self.find(index)].append(index)
        self.groups = []
        self.group_of_space = {}
        for root in sorted(members):
            spaces = [self._spaces[i] for i in sorted(members[root])]
            reasons = list(dict.fromkeys(r for s in spaces for r in s.reasons))
            reason = "; ".join(reasons[:3])
            if len(reasons) > 3:
                reason += f"; and {len(reasons) - 3} more"
            out_refs = tuple(dict.fromkeys(r for s in spaces for r in s.out_refs))
            in_refs = tuple(dict.fromkeys(r for s in spaces for r in s.in_refs))
            group = ChannelGroup(
                id=spaces[0].creator,
                producers=tuple(dict.fromkeys(s.producer for s in spaces if s.producer)),
                size=spaces[0].size,
                prunable=not reasons,
                reason=reason,
                out_params=out_refs,
                in_params=in_refs,
            )
            self.groups.append(group)
            for i in members[root]:
                self.group_of_space[i] = group
        self.group_by_id = {g.id: g for g in self.groups}

    # -- plans -----------------------------------------------------------------
    def pruned(self, plan):
        """{group_id: sorted array of pruned channel indices} for groups that lose channels."""
        result = {}
        for group_id, keep in plan.items():
            group = self.group_by_id[group_id]
            mask = np.ones(group.size, dtype=bool)
            mask[list(keep)] = False
            if mask.any():
                result[group_id] = np.flatnonzero(mask)
        return result

    def tensor_keep(self, key, pruned):
        """Boolean keep-mask of a tensor's channel axis under `pruned`, or None."""
        layout = self.layouts.get(key)
        if layout is None:
            return None
        keep = np.ones(layout.length, dtype=bool)
        for seg in layout.segments:
            group = self.group_of_space[seg.space]
            drop = pruned.get(group.id)
            if drop is None:
                continue
            ref = ParamRef("", "", 0, seg.offset, seg.repeat, seg.stride, seg.block)
            keep[ref.indices(group.size)[drop].ravel()] = False
        return keep

    def weight_keep(self, pruned):
        """{(layer_path, attr): {axis: boolean keep-mask}} of every weight that loses entries."""
        result = {}
        for group_id, drop in pruned.items():
            group = self.group_by_id[group_id]
            for ref in group.out_params + group.in_params:
                axes = result.setdefault((ref.layer, ref.attr), {})
                if ref.axis not in axes:
                    layer = self.layer_at(ref.layer)
                    axes[ref.axis] = np.ones(getattr(layer, ref.attr).shape[ref.axis], dtype=bool)
                axes[ref.axis][ref.indices(group.size)[drop].ravel()] = False
        return result

    def layer_at(self, path):
        if not hasattr(self, "_layers_by_path"):
            self._layers_by_path = {n.path: n.layer for n in self.nodes}
        return self._layers_by_path[path]


_CACHE = collections.OrderedDict()
_CACHE_SIZE = 8


def analyze(model):
    """Cached `_Analysis` of `model` (graphs are immutable once built)."""
    key = id(model)
    hit = _CACHE.get(key)
    # A Sequential model gets a new graph when layers are added or popped.
    graph = graph_of(model)
    version = registry_version()
    if hit is not None and hit[0]() is model and hit[1]() is graph and hit[2] == version:
        _CACHE.move_to_end(key)
        return hit[3]
    analysis = _Analysis(model)
    _CACHE[key] = (weakref.ref(model), weakref.ref(graph), version, analysis)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return analysis


def channel_groups(model):
    """Channel dependency groups of a functional Keras model.

    Args:
        model: a functional (or built sequential) `keras.Model`; nested
            functional and sequential sub-models are analysed through.

    Returns:
        A list of `ChannelGroup` in graph order, unprunable groups included
        (model inputs and outputs, groups touched by unknown layers...).

    Raises:
        ValueError: if `model` is not a functional or built sequential model.

    Example:
        >>> from tfkdp import models
        >>> groups = channel_groups(models.resnet_cifar(8, width=4))
        >>> [(g.id, g.size) for g in groups if g.prunable][:2]
        [('stem_conv', 4), ('stage1_block1_conv1', 4)]
    """
    return list(analyze(model).groups)


def get_layer(model, path):
    """The layer at `path` (`"outer/inner"` resolves into nested models).

    Raises:
        ValueError: if no layer has that path, listing the names at the level
            where the lookup failed.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"layer path must be a non-empty string; received path={path!r}")
    current = model
    for depth, name in enumerate(path.split("/")):
        names = [layer.name for layer in getattr(current, "layers", [])]
        if name not in names:
            where = "/".join(path.split("/")[:depth]) or getattr(model, "name", "model")
            raise ValueError(f"No layer {name!r} (path {path!r}) in {where!r}; available: {names}")
        current = current.layers[names.index(name)]
    return current


def get_weight(model, ref):
    """The variable a `ParamRef` points to.

    Raises:
        ValueError: if the layer or attribute does not exist.
    """
    layer = get_layer(model, ref.layer)
    weight = getattr(layer, ref.attr, None)
    if weight is None or not hasattr(weight, "assign"):
        raise ValueError(
            f"Layer {ref.layer!r} ({type(layer).__name__}) has no weight attribute {ref.attr!r}"
        )
    return weight


def channel_values(model, ref, size):
    """Values of a weight slice arranged per channel.

    Args:
        model: the model the reference belongs to.
        ref: a `ParamRef` from a group's `out_params` or `in_params`.
        size: the group's size.

    Returns:
        A float array of shape `(size, n)`: row `c` holds every weight value
        channel `c` owns in that slice (e.g. for an L1 criterion).
    """
    value = np.moveaxis(np.asarray(get_weight(model, ref).numpy()), ref.axis, 0)
    return value[ref.indices(size)].reshape(int(size), -1)

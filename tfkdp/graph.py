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
import math
import weakref

import keras
import numpy as np

__all__ = [
    "ParamRef",
    "ChannelGroup",
    "Layout",
    "LayerCall",
    "LayerHandler",
    "PassThrough",
    "Producer",
    "Coupler",
    "Unprunable",
    "register_layer",
    "get_handler",
    "registered_layers",
    "channel_groups",
    "get_layer",
    "get_weight",
    "channel_values",
]


# ---------------------------------------------------------------------------
# Public records
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """One weight slice indexed by the channels of a group.

    Attributes:
        layer: path of the layer that owns the weight; layers of nested models
            are written `"outer_model/inner_layer"`.
        attr: attribute of that layer holding the weight (`"kernel"`,
            `"bias"`, `"gamma"`, `"moving_mean"`, `"depthwise_kernel"`, ...).
        axis: non-negative axis of the weight indexed by the channels.
        offset: index on `axis` of the group's channel 0 (non-zero after a
            `Concatenate`).
        repeat: how many times the group's channel block repeats along the
            axis (the number of spatial positions after `Flatten`).
        stride: distance between two repeats; `0` means `size * block`.
        block: consecutive indices owned by one channel (the depth multiplier
            of a depthwise convolution).

    Channel `c` owns the indices `offset + k * stride + c * block + j` for
    `k < repeat`, `j < block`.
    """

    layer: str
    attr: str
    axis: int
    offset: int = 0
    repeat: int = 1
    stride: int = 0
    block: int = 1

    def indices(self, size):
        """Index table of the slice.

        Args:
            size: number of channels of the group.

        Returns:
            An `int64` array of shape `(size, repeat * block)`; row `c` lists
            the indices on `axis` owned by channel `c`.
        """
        size = int(size)
        stride = self.stride or size * self.block
        c = np.arange(size, dtype=np.int64)[:, None, None] * self.block
        k = np.arange(self.repeat, dtype=np.int64)[None, :, None] * stride
        j = np.arange(self.block, dtype=np.int64)[None, None, :]
        return (self.offset + k + c + j).reshape(size, -1)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together.

    Attributes:
        id: stable identifier: the path of the layer that created the group's
            first channel set in graph order (`"stem_conv"`; an output index
            is appended as `"layer:1"` for a layer's second output).
        producers: paths of the layers whose outputs carry these channels as
            new channels (convolutions, dense layers, model inputs, layers of
            unknown type), in graph order.
        size: number of channels.
        prunable: whether channels of this group may be removed.
        reason: why not, when `prunable` is False; `""` otherwise.
        out_params: weight slices that produce or scale the channels: producer
            kernels on their output axis, biases, batch-norm parameters and
            moving statistics, depthwise kernels the channels pass through.
        in_params: weight slices that read the channels: consumer kernels on
            their input axis, dense rows after `Flatten`, separable depthwise
            kernels.
    """

    id: str
    producers: tuple
    size: int
    prunable: bool
    reason: str
    out_params: tuple
    in_params: tuple


# ---------------------------------------------------------------------------
# Channel layouts: how the last axis of a tensor maps onto channel spaces.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Segment:
    space: int
    offset: int
    block: int = 1
    repeat: int = 1
    stride: int = 0

    def shape_key(self, sizes):
        return (sizes[self.space], self.offset, self.block, self.repeat, self.stride)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the channel axis of one tensor maps onto channel groups.

    Handlers receive and return layouts; they never build them by hand but
    through `LayerCall` (`new_channels`, `flatten`, `concat`, `multiply`).

    Attributes:
        segments: internal description of the mapping.
        length: size of the tensor's last axis.
    """

    segments: tuple
    length: int

    @property
    def is_flat(self):
        """True after `Flatten` (a channel repeats over spatial positions)."""
        return any(s.repeat > 1 for s in self.segments)


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


# ---------------------------------------------------------------------------
# Handlers and registry
# ---------------------------------------------------------------------------


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
        return Layout((_Segment(space, 0),), int(size))

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
            outputs.append(Layout((_Segment(space, 0),), int(shape[-1])))
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


class LayerHandler:
    """How one layer type maps channels, and how to rebuild it with fewer.

    Subclass it and register an instance with `register_layer` to teach
    `channel_groups`, `apply_plan` and `strip_channels` a new layer type.

    Attributes:
        maskable: maps a weight attribute to the constructor argument that
            holds its constraint (`{"kernel": "kernel_constraint"}`);
            `apply_plan` masks those weights through that argument. Weights
            that appear in a group but not here (moving statistics) are only
            sliced by `strip_channels`.
    """

    maskable = {}

    def propagate(self, call):
        """Maps the call's input layouts to output layouts.

        Args:
            call: a `LayerCall`.

        Returns:
            A list with one `Layout` (or `None`) per output tensor.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement propagate(call) -> list of layouts"
        )

    def strip_config(self, layer, config, in_keep, out_keep):
        """Config of the layer with pruned channels removed.

        Args:
            layer: the original layer.
            config: a copy of `layer.get_config()` to modify and return.
            in_keep: one boolean array (kept channels of the last axis) or
                `None` per input tensor.
            out_keep: the same per output tensor.

        Returns:
            The new config.
        """
        return config


_REGISTRY = {}
_REGISTRY_VERSION = [0]


def register_layer(cls, handler):
    """Registers how layers of class `cls` (exactly; not subclasses) map channels.

    Args:
        cls: a layer or `keras.Operation` class.
        handler: a `LayerHandler` instance (e.g. `PassThrough()`,
            `Producer("units", out_axis=1, in_axis=0)`, `Unprunable("why")`).

    Raises:
        ValueError: if `cls` is not a class or `handler` is not a `LayerHandler`.

    Example:
        >>> class Scale(keras.layers.Layer):
        ...     def call(self, x):
        ...         return 2.0 * x
        >>> register_layer(Scale, PassThrough())
    """
    if not isinstance(cls, type):
        raise ValueError(f"register_layer expects a class; received cls={cls!r}")
    if not isinstance(handler, LayerHandler):
        raise ValueError(
            f"register_layer expects a LayerHandler instance; received handler={handler!r}"
        )
    _REGISTRY[cls] = handler
    _REGISTRY_VERSION[0] += 1


def get_handler(cls_or_layer):
    """The registered `LayerHandler` of a layer (or class), or `None`."""
    cls = cls_or_layer if isinstance(cls_or_layer, type) else type(cls_or_layer)
    return _REGISTRY.get(cls)


def registered_layers():
    """The registered layer classes, sorted by qualified name."""
    return sorted(_REGISTRY, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _class_name(obj):
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# Activations that act element by element (so per channel). Those with
# f(0) != 0 are included: masks zero the consumers' input slices too, which
# compensates exactly (see the module docstring).
_ELEMENTWISE_ACTIVATIONS = (
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "swish",
    "hard_silu", "hard_swish", "sigmoid", "hard_sigmoid", "sparse_sigmoid", "log_sigmoid",
    "tanh", "hard_tanh", "tanh_shrink", "softplus", "softsign", "sparse_plus", "squareplus",
    "soft_shrink", "hard_shrink", "threshold", "exponential", "mish",
)  # fmt: skip


def _elementwise_functions():
    found = set()
    for name in _ELEMENTWISE_ACTIVATIONS:
        try:
            found.add(keras.activations.get(name))
        except ValueError:
            continue  # not in this Keras version
    return found


def _activation_problem(layer, fn):
    """None if `fn` acts per element, else a reason naming it."""
    if fn is None or fn in _elementwise_functions():
        return None
    name = getattr(fn, "__name__", repr(fn))
    return (
        f"layer '{layer.name}' ({type(layer).__name__}) applies activation '{name}', which is "
        "not known to act element by element (softmax-like activations mix channels)"
    )


def _channels_last_problem(call):
    fmt = getattr(call.layer, "data_format", "channels_last")
    if fmt not in (None, "channels_last"):
        return f"layer '{call.path}' ({type(call.layer).__name__}) uses data_format={fmt!r}"
    return None


def _weight_problem(call):
    """LoRA adapters and quantized kernels are not sliced by the built-in handlers."""
    layer = call.layer
    if getattr(layer, "lora_enabled", False):
        return f"layer '{call.path}' ({type(layer).__name__}) has LoRA enabled"
    if getattr(layer, "quantization_mode", None):
        return (
            f"layer '{call.path}' ({type(layer).__name__}) is quantized ({layer.quantization_mode})"
        )
    return None


def _single_input(call):
    if len(call.inputs) != 1:
        return None, (
            f"layer '{call.path}' ({type(call.layer).__name__}) was called on "
            f"{len(call.inputs)} tensors; its handler expects one"
        )
    return call.inputs[0], None


class PassThrough(LayerHandler):
    """A layer that acts on each channel separately and keeps the channel axis last.

    Args:
        params: `(attr, axis)` pairs of per-channel weights (axis counted on
            the weight; negative allowed), e.g. `(("alpha", -1),)`. Missing
            attributes are skipped.
        maskable: see `LayerHandler.maskable`.
        check_data_format: whether a `data_format` other than
            `channels_last` makes the layer unprunable.
    """

    def __init__(self, params=(), maskable=None, check_data_format=True):
        self.params = tuple(params)
        self.maskable = dict(maskable or {})
        self.check_data_format = check_data_format

    def problem(self, call):
        """A reason why this call cannot pass channels through, or None."""
        if self.check_data_format:
            return _channels_last_problem(call)
        return None

    def propagate(self, call):
        layout, problem = _single_input(call)
        problem = problem or self.problem(call)
        if problem:
            return call.unprunable(problem)
        if layout is not None and any(
            not shape or shape[-1] != layout.length for shape in call.output_shapes
        ):
            return call.unprunable(
                f"layer '{call.path}' ({type(call.layer).__name__}) changes the channel count "
                f"from {layout.length} to {[s[-1] if s else None for s in call.output_shapes]}"
            )
        for attr, axis in self.params:
            weight = getattr(call.layer, attr, None)
            if weight is None or layout is None or len(weight.shape) == 0:
                continue
            if weight.shape[axis] == 1 and layout.length != 1:
                continue  # shared across channels (e.g. PReLU shared_axes), not per channel
            call.produces(layout, attr, axis)
        return [layout] * len(call.output_shapes)


class Producer(LayerHandler):
    """A layer whose output channels are new (convolution, dense).

    Args:
        size_arg: constructor argument holding the output channel count
            (`"filters"`, `"units"`).
        kernel: attribute of the kernel.
        out_axis: kernel axis of the output channels.
        in_axis: kernel axis of the input channels.
        bias: attribute of the bias (axis 0), or None.
        maskable: see `LayerHandler.maskable`; defaults to
            `{kernel: "kernel_constraint", bias: "bias_constraint"}`.
    """

    def __init__(self, size_arg, kernel="kernel", out_axis=-1, in_axis=-2, bias="bias",
                 maskable=None):  # fmt: skip
        self.size_arg = size_arg
        self.kernel = kernel
        self.out_axis = out_axis
        self.in_axis = in_axis
        self.bias = bias
        if maskable is None:
            maskable = {kernel: "kernel_constraint"}
            if bias:
                maskable[bias] = "bias_constraint"
        self.maskable = dict(maskable)

    def propagate(self, call):
        layout, problem = _single_input(call)
        problem = problem or _channels_last_problem(call) or _weight_problem(call)
        groups = int(getattr(call.layer, "groups", 1) or 1)
        if not problem and groups != 1:
            problem = f"layer '{call.path}' ({type(call.layer).__name__}) is a grouped convolution (groups={groups})"
        if problem:
            return call.unprunable(problem)
        call.consumes(layout, self.kernel, self.in_axis)
        out = call.new_channels(0)
        call.produces(out, self.kernel, self.out_axis)
        if self.bias:
            call.produces(out, self.bias, 0)
        problem = _activation_problem(call.layer, getattr(call.layer, "activation", None))
        if problem:
            call.block([out], problem)
        return [out]

    def strip_config(self, layer, config, in_keep, out_keep):
        if out_keep and out_keep[0] is not None:
            config[self.size_arg] = int(np.sum(out_keep[0]))
        return config


def _depthwise_input(call):
    """The one spatial input of a depthwise or separable conv, or why it cannot be pruned."""
    layout, problem = _single_input(call)
    problem = problem or _channels_last_problem(call) or _weight_problem(call)
    if not problem and layout is not None and layout.is_flat:
        problem = f"layer '{call.path}' reads a flattened tensor"
    return layout, problem


class _Depthwise(LayerHandler):
    """Depthwise convolution: channels pass through, `depth_multiplier` copies each."""

    maskable = {"kernel": "depthwise_constraint", "bias": "bias_constraint"}

    def propagate(self, call):
        layout, problem = _depthwise_input(call)
        if problem:
            return call.unprunable(problem)
        if layout is None:
            return call.unprunable(f"layer '{call.path}' input channel count is unknown")
        out = call.multiply(layout, call.layer.depth_multiplier)
        call.produces(layout, "kernel", -2)
        call.produces(out, "bias", 0)
        problem = _activation_problem(call.layer, getattr(call.layer, "activation", None))
        if problem:
            call.block([out], problem)
        return [out]


class _Separable(LayerHandler):
    """Separable convolution: depthwise (reads the input) then pointwise (new channels)."""

    maskable = {
        "depthwise_kernel": "depthwise_constraint",
        "pointwise_kernel": "pointwise_constraint",
        "bias": "bias_constraint",
    }

    def propagate(self, call):
        layout, problem = _depthwise_input(call)
        if problem:
            return call.unprunable(problem)
        if layout is not None:
            call.consumes(layout, "depthwise_kernel", -2)
            call.consumes(
                call.multiply(layout, call.layer.depth_multiplier), "pointwise_kernel", -2
            )
        out = call.new_channels(0)
        call.produces(out, "pointwise_kernel", -1)
        call.produces(out, "bias", 0)
        problem = _activation_problem(call.layer, getattr(call.layer, "activation", None))
        if problem:
            call.block([out], problem)
        return [out]

    def strip_config(self, layer, config, in_keep, out_keep):
        config["filters"] = int(np.sum(out_keep[0]))
        return config


class Coupler(LayerHandler):
    """Element-wise merge (`Add`, `Multiply`, ...): all inputs' channels are tied.

    An input whose channel dimension is 1 while the output's is larger is
    broadcast and not tied. For `keras.ops` operations in the graph, array
    operands other than tensors (a per-channel constant) make the call
    unprunable, since they could not be sliced.
    """

    def propagate(self, call):
        out_shape = call.output_shapes[0]
        width = out_shape[-1] if out_shape else None
        constants = [
            a for a in _flat_arguments(call.node)
            if not isinstance(a, keras.KerasTensor) and np.ndim(a) > 0
        ]  # fmt: skip
        if constants:
            return call.unprunable(
                f"operation '{call.path}' ({type(call.layer).__name__}) has a constant operand "
                f"of shape {np.shape(constants[0])}"
            )
        full = []
        for layout, shape in zip(call.inputs, call.input_shapes, strict=False):
            last = shape[-1] if shape else None
            if last == width:
                full.append(layout)
            elif last != 1 or width is None:
                return call.unprunable(
                    f"layer '{call.path}' merges tensors with channel counts "
                    f"{[s[-1] if s else None for s in call.input_shapes]}"
                )
        if not full:
            return call.unprunable(f"layer '{call.path}' has no input of the output's width")
        if any(layout is None for layout in full):
            call.block(full, f"layer '{call.path}' merges a tensor of unknown channel count")
            return [full[0]]
        call.tie(*full)
        return [full[0]]


def _flat_arguments(node):
    return keras.tree.flatten((node.arguments.args, node.arguments.kwargs))


class _Concatenate(LayerHandler):
    def propagate(self, call):
        rank = len(call.output_shapes[0])
        axis = call.layer.axis if hasattr(call.layer, "axis") else -1
        if axis % rank == rank - 1:
            if any(layout is None for layout in call.inputs):
                return call.unprunable(
                    f"layer '{call.path}' concatenates a tensor of unknown width"
                )
            return [call.concat(call.inputs)]
        # Concatenating along another axis ties the inputs' channels.
        if any(layout is None for layout in call.inputs):
            return call.unprunable(f"layer '{call.path}' concatenates a tensor of unknown width")
        call.tie(*call.inputs)
        return [call.inputs[0]]


class _Flatten(LayerHandler):
    def propagate(self, call):
        layout, problem = _single_input(call)
        problem = problem or _channels_last_problem(call)
        if problem:
            return call.unprunable(problem)
        shape = call.input_shapes[0]
        if len(shape) <= 2:
            return [layout]
        positions = shape[1:-1]
        if layout is None or any(d is None for d in positions):
            return call.unprunable(
                f"layer '{call.path}' flattens a tensor of unknown shape {shape}"
            )
        if math.prod(positions) == 1:
            return [layout]
        return [call.flatten(layout, math.prod(positions))]


class _Reshape(LayerHandler):
    def propagate(self, call):
        layout, problem = _single_input(call)
        if problem:
            return call.unprunable(problem)
        in_shape, out_shape = call.input_shapes[0], call.output_shapes[0]
        if layout is not None and out_shape and out_shape[-1] == in_shape[-1]:
            return [layout]
        reason = f"layer '{call.path}' (Reshape) moves the channel axis: {in_shape} -> {out_shape}"
        if layout is not None and layout.is_flat and out_shape:
            strides = {s.stride for s in layout.segments}
            repeats = {s.repeat for s in layout.segments}
            if len(strides) == 1 and len(repeats) == 1:
                stride, repeat = strides.pop(), repeats.pop()
                if out_shape[-1] == stride and stride * repeat == layout.length:
                    segments = tuple(
                        dataclasses.replace(s, repeat=1, stride=0) for s in layout.segments
                    )
                    return [Layout(segments, stride)]
        return call.unprunable(reason)

    def strip_config(self, layer, config, in_keep, out_keep):
        target = list(config["target_shape"])
        if target and target[-1] != -1 and out_keep[0] is not None:
            target[-1] = int(np.sum(out_keep[0]))
        config["target_shape"] = tuple(target)
        return config


class _Permute(LayerHandler):
    def propagate(self, call):
        layout, problem = _single_input(call)
        if problem:
            return call.unprunable(problem)
        dims = tuple(call.layer.dims)
        if dims and dims[-1] == len(dims):
            return [layout]
        return call.unprunable(f"layer '{call.path}' (Permute dims={dims}) moves the channel axis")


class _Activation(PassThrough):
    def problem(self, call):
        return _activation_problem(call.layer, call.layer.activation)


class _Softmax(PassThrough):
    def problem(self, call):
        rank = len(call.input_shapes[0])
        axes = call.layer.axis if isinstance(call.layer.axis, (list, tuple)) else [call.layer.axis]
        if any(int(a) % rank == rank - 1 for a in axes):
            return f"layer '{call.path}' (Softmax) normalises over the channel axis"
        return None


class _BatchNorm(PassThrough):
    def __init__(self):
        super().__init__(
            params=(("gamma", 0), ("beta", 0), ("moving_mean", 0), ("moving_variance", 0)),
            maskable={"gamma": "gamma_constraint", "beta": "beta_constraint"},
        )

    def problem(self, call):
        rank = len(call.input_shapes[0])
        axis = call.layer.axis
        if isinstance(axis, (list, tuple)):
            axis = axis[0] if len(axis) == 1 else None
        if axis is None or int(axis) % rank != rank - 1:
            return f"layer '{call.path}' (BatchNormalization) normalises axis {call.layer.axis}, not the channel axis"
        if getattr(call.layer, "renorm", False):
            return f"layer '{call.path}' uses batch renormalisation"
        return None


class _AxisNorm(PassThrough):
    """LayerNormalization / UnitNormalization / RMSNormalization: fine only off the channel axis."""

    def problem(self, call):
        rank = len(call.input_shapes[0])
        axis = call.layer.axis
        axes = axis if isinstance(axis, (list, tuple)) else [axis]
        if any(int(a) % rank == rank - 1 for a in axes):
            return (
                f"layer '{call.path}' ({type(call.layer).__name__}) normalises over the channel "
                "axis, so every channel changes every other"
            )
        # Off the channel axis the parameters are not per channel.
        return None


class _Normalization(PassThrough):
    """`keras.layers.Normalization`: per-channel mean/variance when axis is the channel axis."""

    def __init__(self):
        super().__init__(params=(("adapt_mean", -1), ("adapt_variance", -1)))

    def problem(self, call):
        rank = len(call.input_shapes[0])
        axes = tuple(int(a) % rank for a in call.layer.axis)
        if axes in ((), (rank - 1,)):
            return None
        return f"layer '{call.path}' (Normalization) has statistics over axes {call.layer.axis}"

    def strip_config(self, layer, config, in_keep, out_keep):
        keep = in_keep[0]
        for key in ("mean", "variance"):
            value = config.get(key)
            if value is not None and np.ndim(value) >= 1 and keep is not None:
                if np.shape(value)[-1] == keep.shape[0]:
                    config[key] = np.asarray(value)[..., keep].tolist()
        return config


class _Rescaling(PassThrough):
    def strip_config(self, layer, config, in_keep, out_keep):
        keep = in_keep[0]
        for key in ("scale", "offset"):
            value = config.get(key)
            if isinstance(value, dict) or keep is None:
                continue
            if np.ndim(value) >= 1 and np.shape(value)[-1] == keep.shape[0]:
                config[key] = np.asarray(value)[..., keep].tolist()
        return config


class Unprunable(LayerHandler):
    """A layer type known to mix channels: every group it touches is unprunable.

    Args:
        why: explanation appended to the reason.
    """

    def __init__(self, why):
        self.why = why

    def propagate(self, call):
        return call.unprunable(f"layer '{call.path}' ({type(call.layer).__name__}) {self.why}")


def _register_builtins():
    L = keras.layers
    conv_bias = {"kernel": "kernel_constraint", "bias": "bias_constraint"}
    for name in ("Conv1D", "Conv2D", "Conv3D"):
        register_layer(getattr(L, name), Producer("filters", out_axis=-1, in_axis=-2))
    for name in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
        register_layer(
            getattr(L, name), Producer("filters", out_axis=-2, in_axis=-1, maskable=conv_bias)
        )
    register_layer(L.Dense, Producer("units", out_axis=1, in_axis=0))
    for name in ("DepthwiseConv1D", "DepthwiseConv2D"):
        register_layer(getattr(L, name), _Depthwise())
    for name in ("SeparableConv1D", "SeparableConv2D"):
        register_layer(getattr(L, name), _Separable())
    plain = PassThrough()
    for name in (
        "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
        "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
        "MaxPooling1D", "MaxPooling2D", "MaxPooling3D", "AveragePooling1D", "AveragePooling2D",
        "AveragePooling3D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
        "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
        "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D", "Cropping1D", "Cropping2D",
        "Cropping3D", "UpSampling1D", "UpSampling2D", "UpSampling3D", "ReLU", "LeakyReLU", "ELU",
        "Resizing", "CenterCrop",
    ):  # fmt: skip
        if hasattr(L, name):
            register_layer(getattr(L, name), plain)
    register_layer(
        L.PReLU, PassThrough(params=(("alpha", -1),), maskable={"alpha": "alpha_constraint"})
    )
    register_layer(L.Activation, _Activation())
    register_layer(L.Softmax, _Softmax())
    register_layer(L.BatchNormalization, _BatchNorm())
    register_layer(L.Normalization, _Normalization())
    register_layer(L.Rescaling, _Rescaling())
    for name in ("LayerNormalization", "UnitNormalization", "RMSNormalization"):
        if hasattr(L, name):
            register_layer(getattr(L, name), _AxisNorm())
    register_layer(L.GroupNormalization, Unprunable("normalises groups of channels together"))
    coupler = Coupler()
    for name in ("Add", "Subtract", "Maximum", "Minimum", "Average", "Multiply"):
        register_layer(getattr(L, name), coupler)
    register_layer(L.Concatenate, _Concatenate())
    register_layer(L.Flatten, _Flatten())
    register_layer(L.Reshape, _Reshape())
    register_layer(L.Permute, _Permute())
    # Element-wise `keras.ops` calls recorded in functional graphs (`x + y`).
    from keras.src.ops import numpy as knp

    for name in ("Add", "Subtract", "Multiply", "Maximum", "Minimum"):
        if hasattr(knp, name):
            register_layer(getattr(knp, name), coupler)


_register_builtins()


# ---------------------------------------------------------------------------
# Flat graph walk (nested models inlined)
# ---------------------------------------------------------------------------


class _FlatNode:
    __slots__ = ("path", "layer", "node", "inputs", "outputs", "tag", "prefix")

    def __init__(self, path, layer, node, inputs, outputs, tag, prefix):
        self.path = path
        self.layer = layer
        self.node = node
        self.inputs = inputs
        self.outputs = outputs
        self.tag = tag
        self.prefix = prefix


def _graph_of(model):
    """The Functional graph of a functional or built sequential model, else None."""
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional):
        return model
    return None


def _ordered_nodes(graph):
    """Nodes of a Functional graph in the order Keras executes them (by
    decreasing depth); this is the "graph order" of group ids."""
    ordered = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        ordered.extend(graph._nodes_by_depth[depth])
    return ordered


def _is_nested_model(op):
    return isinstance(op, keras.Model) and _graph_of(op) is not None


class _Analysis:
    """Result of walking one model: flat nodes, tensor layouts and groups."""

    def __init__(self, model):
        graph = _graph_of(model)
        if graph is None:
            raise ValueError(
                f"channel analysis needs a functional or built Sequential keras.Model; received "
                f"{_class_name(model)} {getattr(model, 'name', model)!r}. Subclassed models have "
                "no inspectable graph: rebuild them with the functional API."
            )
        self._spaces = []
        self._parent = []
        self._space_index = {}
        self._creations = collections.Counter()
        self.nodes = []
        self.alias = {}
        self.shapes = {}
        self.layouts = {}
        self.producer_of = {}
        self.consumers = collections.Counter()
        self.output_keys = set()
        self.first_tag = {"": ""}
        self._calls = collections.Counter()
        self._first_inputs = {}
        self.input_keys = []
        self._walk(model, "", "", None)
        self.top_outputs = [self.key("", t) for t in graph.outputs]
        self._propagate()
        for key in self.top_outputs:
            name = self._output_name(key)
            self._block(self.layouts.get(key), f"reaches model output '{name}'")
        self._build_groups()

    # -- walking -------------------------------------------------------------
    def key(self, tag, tensor):
        k = (tag, id(tensor))
        while k in self.alias:
            k = self.alias[k]
        return k

    def _output_name(self, key):
        node = self.producer_of.get(key)
        return node.path if node is not None else "input"

    def _walk(self, model, prefix, tag, in_keys):
        graph = _graph_of(model)
        if in_keys is None:
            for tensor in graph.inputs:
                key = (tag, id(tensor))
                self.input_keys.append(key)
                self.shapes[key] = tuple(tensor.shape)
                layer = tensor._keras_history.operation
                size = tensor.shape[-1] if tensor.shape else None
                if size is not None:
                    space = self._space_for(layer.name, 0, int(size), producer=True)
                    self._spaces[space].reasons.append(f"model input '{layer.name}'")
                    self.layouts[key] = Layout((_Segment(space, 0),), int(size))
        else:
            for tensor, key in zip(graph.inputs, in_keys, strict=False):
                self.alias[(tag, id(tensor))] = key
        for node in _ordered_nodes(graph):
            op = node.operation
            if node.is_input:
                continue
            ins = [self.key(tag, t) for t in node.input_tensors]
            for k in ins:
                self.consumers[k] += 1
            path = f"{prefix}{op.name}"
            if _is_nested_model(op):
                self._calls[path] += 1
                sub_tag = f"{path}#{self._calls[path]}"
                self.first_tag.setdefault(path, sub_tag)
                outs = self._walk(op, f"{path}/", sub_tag, ins)
                for tensor, key in zip(node.outputs, outs, strict=False):
                    self.alias[(tag, id(tensor))] = key
                continue
            outs = [(tag, id(t)) for t in node.outputs]
            flat = _FlatNode(path, op, node, ins, outs, tag, prefix)
            for key, tensor in zip(outs, node.outputs, strict=False):
                self.shapes[key] = tuple(tensor.shape)
                self.producer_of[key] = flat
            self.nodes.append(flat)
        outputs = [self.key(tag, t) for t in graph.outputs]
        self.output_keys.update(outputs)
        return outputs

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
            handler = _REGISTRY.get(type(flat.layer))
            if handler is None:
                outputs = call.unprunable(
                    f"layer '{flat.path}' of unregistered class {_class_name(flat.layer)} "
                    "(register it with tfkdp.graph.register_layer)"
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


def _analyze(model):
    """Cached `_Analysis` of `model` (graphs are immutable once built)."""
    key = id(model)
    hit = _CACHE.get(key)
    # A Sequential model gets a new graph when layers are added or popped.
    graph = _graph_of(model)
    version = _REGISTRY_VERSION[0]
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
    return list(_analyze(model).groups)


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

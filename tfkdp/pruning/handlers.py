"""The per-layer handler registry: one handler per layer class, registered once.

How each layer type maps channels comes from a registry keyed by the exact
layer class (`register_layer`). A layer whose class is not registered is never
guessed at: every group it touches is marked unprunable, with a reason that
names the layer and its class. Subclasses of registered layers must be
registered too, since their `call` may differ from their parent's.

This module holds the base class, the registry and the generic handlers a
user combines for a custom layer (`Producer`, `PassThrough`, `Coupler`,
`Unprunable`); `tfkdp.pruning.layers` registers Keras' own layers.
"""

import math

import keras
import numpy as np

__all__ = [
    "LayerHandler",
    "PassThrough",
    "Producer",
    "Coupler",
    "Unprunable",
    "register_layer",
    "get_handler",
    "registered_layers",
    "batchnorm_affine",
    "fold_into",
]


class LayerHandler:
    """Everything tfkdp knows about one layer type, registered once.

    One handler answers, for the layers of its class: how channels flow
    through a call (`propagate`, used by `channel_groups` and so by plans,
    criteria and ADMM), which constructor argument masks a weight
    (`maskable`, used by `apply_plan`), how the config changes when channels
    go (`strip_config`, used by `strip_channels` and `merge_channels`), the
    MACs of a call and how they shrink with the kept channels (`macs`,
    `mac_terms`: `count_macs` and the planner's cost model both read them, so
    they agree), how a following batch norm folds in (`fold`), and how a
    consumer's input slices merge when channels are merged (`merge_input`).
    Subclass it and register an instance with `register_layer` to teach all
    of it at once.

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

    def macs(self, layer, in_shapes, out_shapes):
        """Multiply-accumulates of one call at batch size 1 (0: not counted).

        Args:
            layer: the layer.
            in_shapes: the call's input shapes (batch dimension first, `None`
                replaced by 1).
            out_shapes: its output shapes, likewise.

        Returns:
            An `int`.
        """
        return 0

    def mac_terms(self, layer, macs):
        """How a call's MACs shrink when channels are pruned.

        Args:
            layer: the layer.
            macs: the call's MACs at full width (from `macs`).

        Returns:
            A list of `(share, attrs)`: `share` MACs scale with the product,
            over the weights named in `attrs`, of the kept fraction of every
            axis of that weight that loses entries. The shares sum to `macs`.
        """
        return [(macs, ())] if macs else []

    def fold(self, layer, bn):
        """Folds an inference-mode batch norm `bn` that follows `layer` into it.

        Args:
            layer: the producing layer (called once, linear activation).
            bn: the `BatchNormalization` fed only by `layer`.

        Returns:
            `(config_changes, values)`: constructor arguments to change
            (`{"use_bias": True}`) and `{weight name: value}` of the folded
            layer; or None when this layer type cannot absorb a batch norm.
        """
        return None

    def merge_owned(self, layer, attr):
        """Whether input slice `attr` belongs to the channel it reads (averaged, not summed).

        A separable convolution's depthwise kernel filters each input channel
        on its own before the pointwise sum: merging two identical channels
        is exact only when their depthwise slices are identical too, so
        `hard_average` averages them and `merge_channels` keeps the
        representative's slice. Default: False (a linear consumer's slices
        are summed by `merge_input`).
        """
        return False

    def merge_problem(self, layer):
        """Why channels passing through `layer` cannot be merged exactly, or None.

        A layer holding per-channel constants in its config (a `Rescaling`
        with one scale per channel) keeps merged members apart, and
        `hard_average` cannot average a config; `merge_channels` refuses such
        groups with this reason.
        """
        return None

    def merge_input(self, layer, attr, value, axis, members):
        """Merges the input slices of channels that are merged into one.

        Channel merging (`tfkdp.pruning.surgery.merge_channels`) keeps one
        representative per cluster of identical channels; every weight that
        *reads* the cluster must then read the representative for all its
        members. For a linear consumer (a kernel's input axis) that is the
        sum of the members' slices, which is this default.

        Args:
            layer: the consuming layer.
            attr: the weight attribute (`"kernel"`).
            value: the weight's values (NumPy, float64), modified in place.
            axis: the weight axis that reads the channels.
            members: one index array per cluster: `members[i][0]` is the
                representative's index on `axis`, the rest are merged into it.

        Returns:
            The merged `value`.
        """
        moved = np.moveaxis(value, axis, 0)
        for indices in members:
            if len(indices) > 1:
                moved[indices[0]] = moved[list(indices)].sum(axis=0)
        return value


def batchnorm_affine(bn):
    """`(scale, shift)` (float64) of an inference-mode batch norm: y = x·scale + shift."""
    variance = np.asarray(bn.moving_variance.numpy(), dtype=np.float64)
    scale = 1.0 / np.sqrt(variance + bn.epsilon)
    if bn.scale:
        scale = scale * np.asarray(bn.gamma.numpy(), dtype=np.float64)
    shift = -np.asarray(bn.moving_mean.numpy(), dtype=np.float64) * scale
    if bn.center:
        shift = shift + np.asarray(bn.beta.numpy(), dtype=np.float64)
    return scale, shift


def fold_into(layer, attr, axis, bn, scale_shape=None):
    """Folded values of `layer` when `bn` follows it: `attr` scaled along `axis`.

    Args:
        layer: the producing layer.
        attr: the kernel attribute whose `axis` holds the output channels.
        axis: that axis.
        bn: the batch norm.
        scale_shape: shape of the output channels on the kernel when they
            span two axes (a depthwise kernel's `(in, multiplier)`).

    Returns:
        `({"use_bias": True}, {weight name: value})`.
    """
    scale, shift = batchnorm_affine(bn)
    values = {w.name: w.numpy() for w in layer.weights}
    kernel = getattr(layer, attr)
    value = np.asarray(kernel.numpy(), dtype=np.float64)
    shape = [1] * value.ndim
    if scale_shape is None:
        shape[axis % value.ndim] = scale.size
    else:
        shape[-len(scale_shape):] = scale_shape
    values[kernel.name] = value * scale.reshape(shape)
    bias = getattr(layer, "bias", None)
    bias = np.asarray(bias.numpy(), dtype=np.float64) if bias is not None else 0.0
    values["bias"] = bias * scale + shift
    return {"use_bias": True}, values


def shape_size(shape):
    """Number of entries of `shape` (`None` counts as 1)."""
    return int(math.prod(1 if d is None else int(d) for d in shape))


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


def get_handler(cls_or_layer, inherit=False):
    """The registered `LayerHandler` of a layer (or class), or `None`.

    Args:
        cls_or_layer: a layer or a layer class.
        inherit: also look up the class's bases (used for MAC counting only:
            channel analysis never guesses a subclass's channel mapping).
    """
    cls = cls_or_layer if isinstance(cls_or_layer, type) else type(cls_or_layer)
    if not inherit:
        return _REGISTRY.get(cls)
    for base in cls.__mro__:
        if base in _REGISTRY:
            return _REGISTRY[base]
    return None


def registered_layers():
    """The registered layer classes, sorted by qualified name."""
    return sorted(_REGISTRY, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def registry_version():
    """A counter that changes whenever a handler is registered (for caches)."""
    return _REGISTRY_VERSION[0]


def class_name(obj):
    """The qualified class name of `obj` (for messages)."""
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


def _checked_activation(call, out):
    """`out`, with its groups blocked when the layer's activation is not element-wise."""
    problem = _activation_problem(call.layer, getattr(call.layer, "activation", None))
    if problem:
        call.block([out], problem)
    return out


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
        positions: which tensor's spatial positions each kernel entry is
            applied at: `"output"` (convolution, dense: MACs = output
            positions × kernel size) or `"input"` (transposed convolution).
        foldable: whether a following batch norm folds into the kernel
            (scaled along `out_axis`) and bias.
    """

    def __init__(self, size_arg, kernel="kernel", out_axis=-1, in_axis=-2, bias="bias",
                 maskable=None, positions="output", foldable=True):  # fmt: skip
        if positions not in ("output", "input"):
            raise ValueError(f"positions must be 'output' or 'input'; received {positions!r}")
        self.positions = positions
        self.foldable = foldable
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
        return [_checked_activation(call, out)]

    def strip_config(self, layer, config, in_keep, out_keep):
        if out_keep and out_keep[0] is not None:
            config[self.size_arg] = int(np.sum(out_keep[0]))
        return config

    def macs(self, layer, in_shapes, out_shapes):
        # The kernel's shape at the call's channel counts (shapes may be the pruned ones).
        dims = list(getattr(layer, self.kernel).shape)
        groups = int(getattr(layer, "groups", 1) or 1)
        dims[self.in_axis] = int(in_shapes[0][-1]) // groups
        dims[self.out_axis] = int(out_shapes[0][-1])
        shape = out_shapes[0] if self.positions == "output" else in_shapes[0]
        return shape_size(shape[1:-1]) * shape_size(dims)

    def mac_terms(self, layer, macs):
        return [(macs, (self.kernel,))] if macs else []

    def fold(self, layer, bn):
        if not self.foldable:
            return None
        return fold_into(layer, self.kernel, self.out_axis, bn)


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


class Unprunable(LayerHandler):
    """A layer type known to mix channels: every group it touches is unprunable.

    Args:
        why: explanation appended to the reason.
    """

    def __init__(self, why):
        self.why = why

    def propagate(self, call):
        return call.unprunable(f"layer '{call.path}' ({type(call.layer).__name__}) {self.why}")



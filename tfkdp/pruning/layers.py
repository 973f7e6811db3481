"""Handlers of Keras' own layers, registered on import.

Convolutions and `Dense` are `Producer`s (MACs = output positions × kernel
size, or input positions for transposed convolutions; batch norm folds into
the kernel's output axis); depthwise and separable convolutions, concatenation,
flattening, reshaping, permutation, activations, softmax and the
normalisation layers have their own handlers below; pooling, dropout, padding,
cropping and resizing pass channels through; element-wise merges (`Add`,
`Multiply`, ..., and the `keras.ops` calls a functional graph records for
`x + y`) tie their inputs' channels.
"""

import dataclasses
import math

import keras
import numpy as np

from tfkdp.pruning.handlers import (
    Coupler,
    LayerHandler,
    PassThrough,
    Producer,
    Unprunable,
    _activation_problem,
    _channels_last_problem,
    _checked_activation,
    _single_input,
    _weight_problem,
    fold_into,
    register_layer,
    shape_size,
)
from tfkdp.pruning.records import Layout

__all__ = []


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
        return [_checked_activation(call, out)]

    def macs(self, layer, in_shapes, out_shapes):
        out = out_shapes[0]
        return shape_size(out[1:-1]) * int(out[-1]) * shape_size(layer.kernel_size)

    def mac_terms(self, layer, macs):
        return [(macs, ("kernel",))] if macs else []

    def fold(self, layer, bn):
        kernel = layer.kernel.shape
        return fold_into(layer, "kernel", -1, bn, scale_shape=(kernel[-2], kernel[-1]))


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
        return [_checked_activation(call, out)]

    def strip_config(self, layer, config, in_keep, out_keep):
        config["filters"] = int(np.sum(out_keep[0]))
        return config

    def merge_owned(self, layer, attr):
        return attr == "depthwise_kernel"

    def macs(self, layer, in_shapes, out_shapes):
        mid = int(in_shapes[0][-1]) * int(layer.depth_multiplier)
        positions = shape_size(out_shapes[0][1:-1])
        k = shape_size(layer.kernel_size)
        return positions * mid * k + positions * mid * int(out_shapes[0][-1])

    def mac_terms(self, layer, macs):
        # Depthwise part ∝ cin·multiplier·k, pointwise part ∝ cin·multiplier·cout.
        if not macs:
            return []
        k = shape_size(layer.kernel_size)
        cout = int(layer.pointwise_kernel.shape[-1])
        return [
            (macs * k / (k + cout), ("depthwise_kernel",)),
            (macs * cout / (k + cout), ("pointwise_kernel",)),
        ]

    def fold(self, layer, bn):
        return fold_into(layer, "pointwise_kernel", -1, bn)


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


def _per_channel_constants(layer, keys):
    """A reason naming the config entries of `keys` that hold one value per channel, or None."""
    config = layer.get_config()
    found = [
        k for k in keys
        if not isinstance(config.get(k), dict) and np.size(config.get(k)) > 1
    ]  # fmt: skip
    if not found:
        return None
    return (
        f"layer '{layer.name}' ({type(layer).__name__}) holds per-channel constants {found} in "
        "its config, which channel merging cannot average"
    )


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

    def merge_problem(self, layer):
        return _per_channel_constants(layer, ("mean", "variance"))


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

    def merge_problem(self, layer):
        return _per_channel_constants(layer, ("scale", "offset"))


def _register_builtins():
    L = keras.layers
    conv_bias = {"kernel": "kernel_constraint", "bias": "bias_constraint"}
    for name in ("Conv1D", "Conv2D", "Conv3D"):
        register_layer(getattr(L, name), Producer("filters", out_axis=-1, in_axis=-2))
    for name in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"):
        register_layer(
            getattr(L, name),
            Producer("filters", out_axis=-2, in_axis=-1, maskable=conv_bias, positions="input"),
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



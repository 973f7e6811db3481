"""The records of channel analysis: weight slices, channel groups, tensor layouts.

Conventions (see `tfkdp.pruning.analysis` for how they are found):
- Channels are the last axis of every tensor (`channels_last`).
- A `ParamRef` names one weight slice. Channel `c` of a group of size `size`
  owns, on axis `ref.axis` of the weight, the indices
  `ref.offset + k * stride + c * ref.block + j` for `k in range(ref.repeat)`
  and `j in range(ref.block)`, where `stride = ref.stride or size * ref.block`.
"""

import dataclasses

import numpy as np

__all__ = ["ParamRef", "ChannelGroup", "Layout", "Segment"]


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
class Segment:
    """One run of a group's channels inside a tensor's channel axis (see `ParamRef`)."""

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



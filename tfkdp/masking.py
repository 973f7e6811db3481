"""Channel masks: the structured-pruning wrappers of tfkdp.

`apply_plan(model, plan)` returns a copy of a functional model in which the
channels a `PruningPlan` prunes are exactly zero in every weight slice of
their group: producer kernels and biases, batch-norm gamma and beta,
depthwise kernels, and the consumers' input slices. The masks are ordinary
Keras weight constraints (`ChannelMask`) set through each layer's
`*_constraint` argument, so:

- they stay in force during further training: Keras applies a variable's
  constraint after every optimizer update (`optimizer.apply_gradients`,
  `fit`, custom train steps alike);
- the masked model has the same graph, layer classes and layer names, and
  saves and loads as a plain `.keras` file (import `tfkdp.masking`, or
  `tfkdp`, before `keras.saving.load_model`);
- a constraint the user had set is kept and applied before the mask.

Because consumer slices are masked too, the masked model computes exactly
what `tfkdp.surgery.strip_channels(model, plan)` computes, even where a
pruned channel is not zero (after a sigmoid or a `Rescaling` offset).
Batch-norm moving statistics are left as they are: with gamma and beta at
zero the normalised channel is zero whatever they hold.
"""

import collections

import keras
import numpy as np
from absl import logging

from tfkdp import graph, surgery
from tfkdp.plan import PruningPlan

__all__ = ["ChannelMask", "apply_plan", "plan_of", "unwrap_mask", "mask_axes"]


@keras.saving.register_keras_serializable(package="tfkdp")
class ChannelMask(keras.constraints.Constraint):
    """Keeps the entries of one weight axis outside `keep` at exactly zero.

    Args:
        keep: indices kept on `axis` (any order; stored sorted).
        size: length of `axis`.
        axis: the weight axis the mask applies to (negative counts from the end).
        constraint: an inner constraint (the user's, or another
            `ChannelMask` for a second axis), applied first.

    Raises:
        ValueError: for indices outside `[0, size)`, duplicates, or a
            non-positive size.

    Example:
        >>> mask = ChannelMask(keep=[0, 2], size=3, axis=-1)
        >>> keras.ops.convert_to_numpy(mask(keras.ops.ones((2, 3)))).tolist()
        [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    """

    def __init__(self, keep, size, axis, constraint=None):
        size = int(size)
        if size <= 0:
            raise ValueError(f"ChannelMask size must be positive; received size={size!r}")
        keep = [int(i) for i in keep]
        if len(set(keep)) != len(keep) or any(i < 0 or i >= size for i in keep):
            raise ValueError(
                f"ChannelMask keep indices must be distinct and in [0, {size}); received {keep}"
            )
        self.keep = tuple(sorted(keep))
        self.size = size
        self.axis = int(axis)
        self.constraint = keras.constraints.get(constraint)
        mask = np.zeros(size, dtype=np.float32)
        mask[list(self.keep)] = 1.0
        self._mask = mask

    def keep_mask(self):
        """Boolean array of length `size`, True where kept."""
        return self._mask.astype(bool)

    def __call__(self, w):
        if self.constraint is not None:
            w = self.constraint(w)
        ndim = len(w.shape)
        axis = self.axis % ndim
        if w.shape[axis] != self.size:
            raise ValueError(
                f"ChannelMask for axis {self.axis} of size {self.size} applied to a weight of "
                f"shape {tuple(w.shape)}"
            )
        shape = [1] * ndim
        shape[axis] = self.size
        mask = keras.ops.reshape(keras.ops.convert_to_tensor(self._mask, dtype=w.dtype), shape)
        return w * mask

    def get_config(self):
        return {
            "keep": list(self.keep),
            "size": self.size,
            "axis": self.axis,
            "constraint": (
                keras.constraints.serialize(self.constraint)
                if self.constraint is not None
                else None
            ),
        }


def unwrap_mask(constraint):
    """The constraint under any chain of `ChannelMask`s (the user's own, or None)."""
    while isinstance(constraint, ChannelMask):
        constraint = constraint.constraint
    return constraint


def mask_axes(constraint):
    """`{axis: boolean keep mask}` of a `ChannelMask` chain (empty for anything else).

    Negative axes are returned as given; callers that know the weight's rank
    should normalise them.
    """
    axes = {}
    while isinstance(constraint, ChannelMask):
        keep = constraint.keep_mask()
        axes[constraint.axis] = axes[constraint.axis] & keep if constraint.axis in axes else keep
        constraint = constraint.constraint
    return axes


def _weights_by_path(weight_keep):
    by_path = collections.defaultdict(dict)
    for (path, attr), axes in weight_keep.items():
        by_path[path][attr] = axes
    return by_path


def apply_plan(model, plan):
    """Masks the channels a plan prunes; returns a new model.

    Args:
        model: a functional (or sequential) `keras.Model`; not modified. If
            it already carries `ChannelMask`s they are replaced by the new
            plan's (an empty plan removes them).
        plan: a `PruningPlan` (or a mapping accepted by its constructor).

    Returns:
        A new `keras.Model` with the same graph and layer names, the input
        model's weights, and pruned channels exactly zero in every weight
        slice of their group (kept zero by `ChannelMask` constraints during
        training).

    Raises:
        ValueError: if the plan does not fit the model (see
            `PruningPlan.validate`) or a layer cannot be re-created.

    Example:
        >>> from tfkdp import models
        >>> model = models.resnet_cifar(8, width=4)
        >>> masked = apply_plan(model, {"stage1_block1_conv1": [0, 1]})
        >>> float(abs(masked.get_layer("stage1_block1_conv1").kernel[..., 2:]).numpy().max())
        0.0
    """
    analysis, plan = surgery._as_plan(model, plan)
    pruned = analysis.pruned(plan)
    weight_keep = analysis.weight_keep(pruned)
    by_path = _weights_by_path(weight_keep)
    by_variable = {}
    zeroed = set()

    def make_layer(path, layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.Layer):
            return surgery._recreate(layer, config)
        config = surgery._unmask_config(layer, config)
        handler = graph.get_handler(layer)
        maskable = handler.maskable if handler is not None else {}
        for attr, axes in by_path.get(path, {}).items():
            variable = getattr(layer, attr)
            by_variable[id(variable)] = axes
            key = maskable.get(attr)
            if key is None or key not in config:
                if variable.trainable:
                    zeroed.add(id(variable))
                    logging.warning(
                        "Weight '%s' of layer '%s' (%s) has no registered constraint argument: "
                        "its pruned entries are zeroed now but training can revive them.",
                        attr, path, type(layer).__name__,
                    )  # fmt: skip
                continue
            zeroed.add(id(variable))
            constraint = keras.constraints.get(config[key])
            for axis, keep in sorted(axes.items()):
                constraint = ChannelMask(np.flatnonzero(keep), keep.size, axis, constraint)
            config[key] = constraint
        return surgery._recreate(layer, config)

    def weights(path, old, new):
        values = []
        for variable in old.weights:
            value = variable.numpy()
            if id(variable) in zeroed:
                for axis, keep in by_variable[id(variable)].items():
                    shape = [1] * value.ndim
                    shape[axis] = keep.size
                    value = value * keep.reshape(shape).astype(value.dtype)
            values.append(value)
        return values

    return surgery._Rebuild(analysis, make_layer, weights).run(model)


def plan_of(model):
    """The `PruningPlan` a masked model carries in its `ChannelMask`s.

    Args:
        model: a model returned by `apply_plan` (or loaded from its `.keras`
            file).

    Returns:
        A `PruningPlan`; a group keeps the channels none of its masks zero.
        Groups with no mask are absent (they keep everything).

    Example:
        >>> from tfkdp import models
        >>> masked = apply_plan(models.resnet_cifar(8, width=4), {"stage1_block1_conv1": [1, 3]})
        >>> plan_of(masked).keep("stage1_block1_conv1")
        (1, 3)
    """
    analysis = graph._analyze(model)
    keep = {}
    for group in analysis.groups:
        if not group.prunable:
            continue
        kept = np.ones(group.size, dtype=bool)
        found = False
        for ref in group.out_params + group.in_params:
            variable = getattr(analysis.layer_at(ref.layer), ref.attr)
            ndim = len(variable.shape)
            axes = {
                a % ndim: m for a, m in mask_axes(getattr(variable, "constraint", None)).items()
            }
            if ref.axis in axes:
                found = True
                kept &= axes[ref.axis][ref.indices(group.size)].all(axis=1)
        if found and not kept.all():
            keep[group.id] = np.flatnonzero(kept).tolist()
    return PruningPlan(keep)

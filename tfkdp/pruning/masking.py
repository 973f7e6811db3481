"""Channel masks: the structured-pruning wrappers of tfkdp.

`apply_plan(model, plan)` returns a copy of a functional model in which the
channels a `PruningPlan` prunes are exactly zero in every weight slice of
their group: producer kernels and biases, batch-norm gamma and beta,
depthwise kernels, and the consumers' input slices. The masks are ordinary
Keras weight constraints (`tfkdp.pruning.masks.ChannelMask`) set through
each layer's `*_constraint` argument, whose masks are non-trainable
variables (masks as state), so:

- they stay in force during further training: Keras applies a variable's
  constraint after every optimizer update (`optimizer.apply_gradients`,
  `fit`, custom train steps alike);
- the masked model has the same graph, layer classes and layer names, and
  saves and loads as a plain `.keras` file (import `tfkdp` before
  `keras.saving.load_model`); the masks are weights of that file, not config;
- a recipe can change a mask variable during training without rebuilding or
  recompiling (see `tfkdp.pruning.masks`);
- a constraint the user had set is kept and applied before the mask.

Because consumer slices are masked too, the masked model computes exactly
what `tfkdp.strip_channels(model, plan)` computes, even where a
pruned channel is not zero (after a sigmoid or a `Rescaling` offset).
Batch-norm moving statistics are left as they are: with gamma and beta at
zero the normalised channel is zero whatever they hold.
"""

import collections

import keras
import numpy as np
from absl import logging

from tfkdp.pruning.analysis import analyze
from tfkdp.pruning.handlers import get_handler
from tfkdp.pruning.masks import ChannelMask, mask_axes
from tfkdp.pruning.plan import PruningPlan
from tfkdp.pruning.rebuild import Rebuild, as_plan, parameters, recreate, unmask_config

__all__ = ["apply_plan", "plan_of"]


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
    analysis, plan = as_plan(model, plan)
    pruned = analysis.pruned(plan)
    weight_keep = analysis.weight_keep(pruned)
    by_path = _weights_by_path(weight_keep)
    by_variable = {}
    zeroed = set()

    def make_layer(path, layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.Layer):
            return recreate(layer, config)
        config = unmask_config(layer, config)
        handler = get_handler(layer)
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
                constraint = ChannelMask(keep.size, axis, keep=np.flatnonzero(keep), constraint=constraint)
            config[key] = constraint
        return recreate(layer, config)

    def weights(path, old, new):
        values = []
        for variable in parameters(old):
            value = variable.numpy()
            if id(variable) in zeroed:
                for axis, keep in by_variable[id(variable)].items():
                    shape = [1] * value.ndim
                    shape[axis] = keep.size
                    value = value * keep.reshape(shape).astype(value.dtype)
            values.append(value)
        return values

    return Rebuild(analysis, make_layer, weights).run(model)


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
    analysis = analyze(model)
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

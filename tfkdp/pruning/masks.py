"""Pruning masks held as state: non-trainable variables a recipe can change.

A mask is a weight constraint that owns its mask as a non-trainable
variable. Set through a layer's `*_constraint` argument, it:

- multiplies the weight by the mask after every optimizer update (Keras
  applies a variable's constraint after `apply_gradients`, in `fit` and in
  custom train steps alike), so pruned entries stay exactly zero;
- keeps the mask in a variable, not in the config: a recipe changes which
  entries are pruned with `mask.assign(...)` during training, without
  rebuilding the model or recompiling the train step (the next update reads
  the new mask; `enforce(model)` applies it at once);
- is tracked by the layer it constrains (it is a small Keras layer), so the
  mask is part of `layer.weights`, of checkpoints and of the `.keras` file,
  while the layer config holds only its size and axis.

`ChannelMask` masks one axis (whole channels, structured pruning);
`WeightMask` masks every entry (element-wise, unstructured pruning).
`is_mask_variable(v)` tells mask state from model parameters (`count_params`
and the rebuild engine skip it).
"""

import keras
import numpy as np

__all__ = [
    "ChannelMask",
    "WeightMask",
    "is_mask_variable",
    "unwrap_mask",
    "mask_axes",
    "enforce",
]

_MASK_VARIABLE_NAMES = ("channel_mask", "weight_mask")


class _MaskConstraint(keras.layers.Layer, keras.constraints.Constraint):
    """Base of the mask constraints: a layer (for tracking) called like a constraint."""

    def __init__(self, constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.constraint = keras.constraints.get(constraint)
        self.built = True

    def __call__(self, w):
        # A constraint, not a layer call: plain math, no layer-call machinery.
        if self.constraint is not None:
            w = self.constraint(w)
        return w * self._broadcast(w)

    def _broadcast(self, w):
        raise NotImplementedError(f"{type(self).__name__} must implement _broadcast(w)")

    def _inner_config(self):
        if self.constraint is None:
            return None
        return keras.constraints.serialize(self.constraint)

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="tfkdp")
class ChannelMask(_MaskConstraint):
    """Keeps the entries of one weight axis outside the mask at exactly zero.

    Args:
        size: length of `axis`.
        axis: the weight axis the mask applies to (negative counts from the end).
        keep: indices kept initially (default: all). Only the initial value:
            the mask lives in the non-trainable variable `mask` (float 0/1,
            shape `(size,)`), which a recipe may assign at any time.
        constraint: an inner constraint (the user's, or another
            `ChannelMask` for a second axis), applied first.

    Raises:
        ValueError: for indices outside `[0, size)`, duplicates, or a
            non-positive size.

    Example:
        >>> mask = ChannelMask(size=3, axis=-1, keep=[0, 2])
        >>> keras.ops.convert_to_numpy(mask(keras.ops.ones((2, 3)))).tolist()
        [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    """

    def __init__(self, size, axis, keep=None, constraint=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(constraint=constraint, **kwargs)
        size = int(size)
        if size <= 0:
            raise ValueError(f"ChannelMask size must be positive; received size={size!r}")
        initial = np.ones(size, dtype=np.float32)
        if keep is not None:
            keep = [int(i) for i in keep]
            if len(set(keep)) != len(keep) or any(i < 0 or i >= size for i in keep):
                raise ValueError(
                    f"ChannelMask keep indices must be distinct and in [0, {size}); received {keep}"
                )
            initial[:] = 0.0
            initial[keep] = 1.0
        self.size = size
        self.axis = int(axis)
        self.mask = self.add_weight(
            shape=(size,), initializer=keras.initializers.Constant(initial), trainable=False,
            name="channel_mask",
        )  # fmt: skip

    @property
    def keep(self):
        """Sorted indices of the kept entries (read from the mask variable)."""
        return tuple(int(i) for i in np.flatnonzero(self.keep_mask()))

    def keep_mask(self):
        """Boolean array of length `size`, True where kept."""
        return keras.ops.convert_to_numpy(self.mask) > 0.5

    def _broadcast(self, w):
        ndim = len(w.shape)
        axis = self.axis % ndim
        if w.shape[axis] != self.size:
            raise ValueError(
                f"ChannelMask for axis {self.axis} of size {self.size} applied to a weight of "
                f"shape {tuple(w.shape)}"
            )
        shape = [1] * ndim
        shape[axis] = self.size
        return keras.ops.reshape(keras.ops.cast(self.mask, w.dtype), shape)

    def get_config(self):
        return {"size": self.size, "axis": self.axis, "constraint": self._inner_config()}


@keras.saving.register_keras_serializable(package="tfkdp")
class WeightMask(_MaskConstraint):
    """Keeps the masked entries of a weight at exactly zero (element-wise pruning).

    Args:
        shape: the weight's shape.
        constraint: an inner constraint applied first.

    The mask is the non-trainable variable `mask` (float 0/1, the weight's
    shape), all ones at first; a pruning schedule assigns it.

    Example:
        >>> mask = WeightMask(shape=(2, 2))
        >>> _ = mask.mask.assign([[1.0, 0.0], [0.0, 1.0]])
        >>> keras.ops.convert_to_numpy(mask(keras.ops.ones((2, 2)))).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """

    def __init__(self, shape, constraint=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(constraint=constraint, **kwargs)
        shape = tuple(int(d) for d in shape)
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"WeightMask shape must have positive dimensions; received {shape}")
        self.shape = shape
        # A pruner assigns the mask inside the train step (replica context under
        # tf.distribute): "only_first_replica" makes that assignment legal.
        self.mask = self.add_weight(
            shape=shape, initializer="ones", trainable=False, name="weight_mask",
            aggregation="only_first_replica",
        )  # fmt: skip

    def _broadcast(self, w):
        if tuple(w.shape) != self.shape:
            raise ValueError(
                f"WeightMask of shape {self.shape} applied to a weight of shape {tuple(w.shape)}"
            )
        return keras.ops.cast(self.mask, w.dtype)

    def get_config(self):
        return {"shape": list(self.shape), "constraint": self._inner_config()}


def is_mask_variable(variable):
    """True for the mask variable of a `ChannelMask` or `WeightMask`."""
    name = getattr(variable, "name", "")
    return name in _MASK_VARIABLE_NAMES and not getattr(variable, "trainable", True)


def unwrap_mask(constraint):
    """The constraint under any chain of masks (the user's own, or None)."""
    while isinstance(constraint, _MaskConstraint):
        constraint = constraint.constraint
    return constraint


def mask_axes(constraint):
    """`{axis: boolean keep mask}` of the `ChannelMask`s in a constraint chain.

    Negative axes are returned as given; callers that know the weight's rank
    should normalise them.
    """
    axes = {}
    while isinstance(constraint, _MaskConstraint):
        if isinstance(constraint, ChannelMask):
            keep = constraint.keep_mask()
            axis = constraint.axis
            axes[axis] = axes[axis] & keep if axis in axes else keep
        constraint = constraint.constraint
    return axes


def enforce(model):
    """Applies every mask constraint of `model` to its weight now.

    A recipe that assigns a mask mid-training calls this so the forward pass
    sees the new mask before the next optimizer update.

    Returns:
        The number of weights constrained.
    """
    count = 0
    for variable in model.weights:
        constraint = getattr(variable, "constraint", None)
        if isinstance(constraint, _MaskConstraint):
            variable.assign(constraint(variable))
            count += 1
    return count

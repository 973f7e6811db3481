"""Weight (unstructured) pruning: element-wise magnitude masks held as state.

`apply_weight_masks(model)` returns a copy of a functional model whose
prunable kernels carry a `tfkdp.pruning.masks.WeightMask` constraint: the
mask is a non-trainable variable of the model (in `layer.weights`, in
checkpoints and in the `.keras` file), and Keras applies the constraint after
every optimizer update, so a pruned entry stays exactly zero through any
further training (`fit`, the `Distiller`, custom steps alike).

`WeightPruner(masked, schedule)` raises the sparsity during training. It is
the `Distiller`'s `sparsity` term (a zero penalty whose
`on_train_step_end(optimizer.iterations)` runs inside the compiled train step
after each update) or, without a teacher, driven by `WeightPruningCallback`.
At the steps where the schedule's `should_prune` is true it ranks the
prunable weights by magnitude and zeroes the smallest, either per layer
(every layer at the schedule's sparsity) or globally (one threshold over all
prunable weights); the count is exact: `floor(s·n + 1/2)` of `n` entries,
ties broken by position. The schedule follows tfmot's `PruningSchedule`
protocol, so `tfkdp.schedules.PolynomialDecay` and tfmot's own
`PolynomialDecay` both drive it.

`remove_weight_masks(masked)` drops the masks and keeps the zeros: a plain
model of the same layers for export (the zeros make files compressible;
dense kernels still multiply them, see README).

Which weights are prunable (`prunable_layers`): by default the kernels of
`Conv1D/2D/3D`, their transposed forms and `Dense`, except the first
convolution of the graph (its few input channels carry the whole image);
depthwise kernels are never pruned by default (9 weights per channel: a
zero there removes a large share of the channel's filter). Pass
`layers=[paths]` or a predicate to choose others.

Reference:
    Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of
    pruning for model compression", arXiv:1710.01878, 2017 (gradual magnitude
    pruning); Han et al., "Learning both Weights and Connections for
    Efficient Neural Networks", NIPS 2015.
"""

import keras
import numpy as np
import tensorflow as tf

from tfkdp import checks
from tfkdp.pruning.masks import ChannelMask, WeightMask, _MaskConstraint
from tfkdp.pruning.sparsity import schedules
from tfkdp.train import runtime

__all__ = [
    "SCOPES",
    "prunable_layers",
    "apply_weight_masks",
    "remove_weight_masks",
    "weight_masks",
    "weight_sparsity",
    "magnitude_masks",
    "WeightPruner",
    "WeightPruningCallback",
]

SCOPES = ("layer", "global")

_KERNEL_LAYERS = (
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose,
    keras.layers.Dense,
)  # fmt: skip
_CONV_LAYERS = _KERNEL_LAYERS[:-1] + (
    keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
    keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
)  # fmt: skip


def _graph_layers(model):
    """`[(path, layer)]` of every leaf layer, in graph order, nested models inlined, once each."""
    from tfkdp.pruning.walker import FlatGraph

    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; received {type(model).__name__}")
    seen, result = set(), []
    for node in FlatGraph(model).nodes:
        if node.path in seen or not isinstance(node.layer, keras.layers.Layer):
            continue
        seen.add(node.path)
        result.append((node.path, node.layer))
    return result


def _maskable(layer):
    return getattr(layer, "kernel", None) is not None and "kernel_constraint" in layer.get_config()


def prunable_layers(model, layers=None):
    """Paths of the layers whose kernel weight pruning masks.

    Args:
        model: a functional or sequential `keras.Model` (nested models are
            looked through; paths are `outer/inner`).
        layers: `None` for the default (conv and dense kernels, not
            depthwise, not the first conv of the graph), a list of layer
            paths, or a predicate `layer -> bool` over the layers that have
            a `kernel` and a `kernel_constraint` argument.

    Returns:
        The paths, in graph order.

    Raises:
        ValueError: for a path that is not a layer of `model`, a layer
            without a maskable kernel, or a selection that is empty.

    Example:
        >>> from tfkdp import models
        >>> prunable_layers(models.resnet_cifar(8, width=4))[:2]
        ['stage1_block1_conv1', 'stage1_block1_conv2']
    """
    graph = _graph_layers(model)
    if layers is None:
        first_conv = next((p for p, layer in graph if isinstance(layer, _CONV_LAYERS)), None)
        paths = [
            p for p, layer in graph
            if isinstance(layer, _KERNEL_LAYERS) and _maskable(layer) and p != first_conv
        ]  # fmt: skip
    elif callable(layers):
        paths = [p for p, layer in graph if _maskable(layer) and layers(layer)]
    else:
        if isinstance(layers, str):
            layers = [layers]
        by_path = dict(graph)
        paths = []
        for path in layers:
            if path not in by_path:
                raise ValueError(
                    f"layers names {path!r}, which is not a layer of model {model.name!r}; "
                    f"layers with a maskable kernel: {[p for p, lay in graph if _maskable(lay)]}"
                )
            if not _maskable(by_path[path]):
                raise ValueError(
                    f"layer {path!r} ({type(by_path[path]).__name__}) has no kernel with a "
                    "kernel_constraint argument; weight masks cannot hold it at zero"
                )
        wanted = set(layers)
        paths = [p for p, _ in graph if p in wanted]
    if not paths:
        raise ValueError(
            f"no prunable layer selected in model {model.name!r} (layers={layers!r}); weight "
            "pruning needs at least one conv or dense kernel"
        )
    return paths


def _chain(constraint):
    chain = []
    while isinstance(constraint, _MaskConstraint):
        chain.append(constraint)
        constraint = constraint.constraint
    return chain, constraint


def _rebuild_chain(constraint, drop_weight_masks):
    """The same constraint chain, new mask objects (`WeightMask`s dropped if asked)."""
    chain, inner = _chain(constraint)
    for mask in reversed(chain):
        if isinstance(mask, WeightMask):
            if not drop_weight_masks:
                inner = WeightMask(mask.shape, constraint=inner)
        elif isinstance(mask, ChannelMask):
            inner = ChannelMask(mask.size, mask.axis, constraint=inner)
        else:
            inner = type(mask).from_config(dict(mask.get_config(), constraint=inner))
    return inner


def _copy_mask_state(old_layer, new_layer):
    """Copies the mask variables of every constraint chain of `old_layer` into `new_layer`'s."""
    for old_var in old_layer.weights:
        chain, _ = _chain(getattr(old_var, "constraint", None))
        if not chain:
            continue
        attr = old_var.path.split("/")[-1]
        new_var = next((v for v in new_layer.weights if v.path.split("/")[-1] == attr), None)
        if new_var is None:
            continue
        new_chain, _ = _chain(getattr(new_var, "constraint", None))
        for mask in chain:
            match = next(
                (m for m in new_chain
                 if type(m) is type(mask) and tuple(m.mask.shape) == tuple(mask.mask.shape)),
                None,
            )  # fmt: skip
            if match is not None:
                new_chain.remove(match)
                match.mask.assign(mask.mask)


def _rebuild(model, change_config):
    from tfkdp.pruning.analysis import analyze
    from tfkdp.pruning.rebuild import Rebuild, parameters, recreate

    def make_layer(path, layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.Layer):
            for key, value in list(config.items()):
                if key.endswith("_constraint") and value is not None:
                    config[key] = _rebuild_chain(keras.constraints.get(value), False)
            change_config(path, layer, config)
        return recreate(layer, config)

    def weights(path, old, new):
        values = []
        for variable in parameters(old):
            value = variable.numpy()
            chain, _ = _chain(getattr(variable, "constraint", None))
            for mask in chain:
                if isinstance(mask, WeightMask):
                    value = value * keras.ops.convert_to_numpy(mask.mask).astype(value.dtype)
            values.append(value)
        return values

    rebuild = Rebuild(analyze(model), make_layer, weights)
    new_model = rebuild.run(model)
    for _, old, new in rebuild.pairs:
        _copy_mask_state(old, new)
    return new_model


def apply_weight_masks(model, layers=None):
    """A copy of `model` whose prunable kernels carry `WeightMask`s; returns it.

    The masks start all ones (nothing pruned) unless the input already holds
    weight masks on those kernels, whose state is copied. Masks on other
    weights (channel masks) are kept with their state. The input is not
    modified.

    Args:
        model: a functional or sequential `keras.Model`.
        layers: which kernels to mask (see `prunable_layers`).

    Returns:
        A new `keras.Model`: same graph, layer names and weights.

    Raises:
        ValueError: for a bad `layers` selection.

    Example:
        >>> from tfkdp import models
        >>> masked = apply_weight_masks(models.resnet_cifar(8, width=4))
        >>> sorted(weight_masks(masked))[:1]
        ['logits']
    """
    selected = set(prunable_layers(model, layers))

    def change(path, layer, config):
        if path not in selected:
            return
        constraint = keras.constraints.get(config["kernel_constraint"])
        chain, _ = _chain(constraint)
        if not any(isinstance(m, WeightMask) for m in chain):
            config["kernel_constraint"] = WeightMask(tuple(layer.kernel.shape), constraint=constraint)

    return _rebuild(model, change)


def remove_weight_masks(model):
    """A copy of `model` without `WeightMask`s; pruned entries stay exactly zero.

    Channel masks, if any, are kept with their state. The input is not modified.

    Args:
        model: a model returned by `apply_weight_masks` (or loaded from its
            `.keras` file).

    Returns:
        A new `keras.Model` of the same layers whose kernels hold the zeros.
    """

    def change(path, layer, config):
        for key, value in list(config.items()):
            if key.endswith("_constraint") and isinstance(value, _MaskConstraint):
                config[key] = _rebuild_chain(value, True)

    return _rebuild(model, change)


def weight_masks(model):
    """`{layer path: WeightMask}` of the weight masks of `model`, in graph order."""
    result = {}
    for path, layer in _graph_layers(model):
        for variable in layer.weights:
            chain, _ = _chain(getattr(variable, "constraint", None))
            for mask in chain:
                if isinstance(mask, WeightMask):
                    result[path] = mask
    return result


def weight_sparsity(model):
    """The sparsity the weight masks of `model` hold.

    Returns:
        `{"pruned": int, "total": int, "sparsity": float in [0, 1], "layers":
        {path: sparsity}}`: zeros in the masks over their entries.

    Raises:
        ValueError: if `model` has no weight masks.
    """
    masks = weight_masks(model)
    if not masks:
        raise ValueError(
            f"model {model.name!r} has no weight masks; create them with apply_weight_masks(model)"
        )
    layers, pruned, total = {}, 0, 0
    for path, mask in masks.items():
        values = keras.ops.convert_to_numpy(mask.mask)
        zeros = int(np.sum(values < 0.5))
        layers[path] = zeros / values.size
        pruned += zeros
        total += int(values.size)
    return {"pruned": pruned, "total": total, "sparsity": pruned / total, "layers": layers}


def _keep_masks(scores, k):
    """Float 0/1 masks (flat) with exactly the `k` smallest scores zeroed (ties: lower index)."""
    order = tf.argsort(scores, stable=True)
    ranks = tf.argsort(order, stable=True)
    return tf.cast(ranks >= tf.cast(k, ranks.dtype), tf.float32)


def _prune_count(sparsity, n):
    # floor(s·n + 1/2): the nearest count, halves up; float64 keeps n·s exact enough.
    s = tf.cast(sparsity, tf.float64)
    return tf.cast(tf.floor(s * float(n) + 0.5), tf.int32)


def magnitude_masks(values, sparsity, scope="layer"):
    """Keep masks that zero the smallest-magnitude entries of `values`.

    Args:
        values: a list of weight tensors.
        sparsity: fraction of entries to zero (scalar, in [0, 1)).
        scope: `"layer"` zeroes `floor(s·n_i + 1/2)` entries of each tensor;
            `"global"` zeroes `floor(s·N + 1/2)` of all `N` entries together
            (one magnitude threshold across tensors).

    Returns:
        A list of float32 0/1 tensors, one per value, of its shape.

    Raises:
        ValueError: for an unknown scope.

    Example:
        >>> masks = magnitude_masks([tf.constant([[0.1, -2.0], [0.5, 0.0]])], 0.5)
        >>> masks[0].numpy().tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    checks.check_choice("scope", scope, SCOPES)
    values = [tf.convert_to_tensor(v) for v in values]
    sizes = [int(np.prod(v.shape)) for v in values]
    if scope == "layer":
        return [
            tf.reshape(_keep_masks(tf.reshape(tf.abs(tf.cast(v, tf.float32)), [-1]),
                                   _prune_count(sparsity, n)), v.shape)
            for v, n in zip(values, sizes, strict=True)
        ]  # fmt: skip
    flat = tf.concat([tf.reshape(tf.abs(tf.cast(v, tf.float32)), [-1]) for v in values], axis=0)
    keep = _keep_masks(flat, _prune_count(sparsity, sum(sizes)))
    parts = tf.split(keep, sizes)
    return [tf.reshape(p, v.shape) for p, v in zip(parts, values, strict=True)]


class _Target:
    """One masked kernel: the weight variable and its mask variable (not tracked twice)."""

    def __init__(self, path, variable, mask):
        self.path = path
        self.variable = variable
        self.mask = mask


@keras.saving.register_keras_serializable(package="tfkdp")
class WeightPruner(keras.layers.Layer):
    """Raises the weight sparsity of a masked model during training (magnitude pruning).

    As the `Distiller`'s `sparsity` term it adds nothing to the loss
    (`pruner()` is 0) and its `on_train_step_end(optimizer.iterations)` runs
    inside the compiled train step after each optimizer update: where the
    schedule's `should_prune` is true it recomputes the masks at the
    schedule's sparsity from the current magnitudes and zeroes the weights at
    once; in between the masks hold (the `WeightMask` constraints re-apply
    them after every update). Without a teacher, `WeightPruningCallback`
    drives the same hook from `fit`.

    The masks are the model's own variables: the pruner holds no state of
    its own (the step is `optimizer.iterations`), so a checkpoint of the
    model and optimizer resumes the same ramp.

    Args:
        model: a model with weight masks (`apply_weight_masks`).
        sparsity_schedule: `schedule(step) -> (should_prune, sparsity)`
            (tfmot's `PruningSchedule` protocol: a `tfkdp.schedules`
            schedule or tfmot's own), or a number in [0, 1) for a constant
            sparsity applied at every step.
        scope: `"layer"` (each kernel at the sparsity) or `"global"` (one
            threshold over every masked kernel).
        name: layer name.

    Raises:
        ValueError: if `model` has no weight masks, for an unknown scope, or a
            schedule that is not callable.

    Example:
        >>> from tfkdp.pruning import unstructured
        >>> masked = unstructured.apply_weight_masks(student)
        >>> pruner = unstructured.WeightPruner(
        ...     masked, tfkdp.schedules.PolynomialDecay(0.0, 0.5, 0, 8, frequency=2))
        >>> distiller = tfkdp.Distiller(teacher, masked, sparsity=pruner)
        >>> round(pruner.prune_to(0.5)["sparsity"], 2)
        0.5

    Reference:
        Zhu & Gupta, arXiv:1710.01878, 2017.
    """

    def __init__(self, model, sparsity_schedule, scope="layer", name="weight_pruner", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scope = checks.check_choice("scope", scope, SCOPES)
        if isinstance(sparsity_schedule, (int, float)) and not isinstance(sparsity_schedule, bool):
            sparsity_schedule = schedules.ConstantSparsity(sparsity_schedule, 0, frequency=1)
        self.sparsity_schedule = schedules.get_sparsity_schedule(sparsity_schedule)
        masks = weight_masks(model)
        if not masks:
            raise ValueError(
                f"model {model.name!r} has no weight masks; create them first with "
                "tfkdp.pruning.unstructured.apply_weight_masks(model)"
            )
        by_path = dict(_graph_layers(model))
        targets = []
        for path, mask in masks.items():
            variable = next(
                v for v in by_path[path].weights
                if any(m is mask for m in _chain(getattr(v, "constraint", None))[0])
            )
            targets.append(_Target(path, variable, mask.mask))
        self._targets = _Targets(targets)
        self.built = True

    @property
    def paths(self):
        """Paths of the pruned layers, in graph order."""
        return [t.path for t in self._targets.items]

    def __call__(self, *args, **kwargs):
        # Keras' Layer.__call__ needs an input tensor; the penalty has none.
        del args, kwargs
        return tf.constant(0.0, tf.float32)

    def _prune(self, sparsity):
        targets = self._targets.items
        values = [t.variable.value for t in targets]
        masks = magnitude_masks(values, sparsity, self.scope)
        for target, mask in zip(targets, masks, strict=True):
            target.mask.assign(tf.cast(mask, target.mask.dtype))
            target.variable.assign(target.variable.value * tf.cast(mask, target.variable.dtype))
        return tf.constant(True)

    def on_train_step_end(self, iterations):
        """Prunes to the schedule's sparsity where `should_prune` (graph-safe).

        Args:
            iterations: `optimizer.iterations` after the update (int tensor).

        Returns:
            A bool tensor, whether the masks were recomputed.
        """
        # Under a strategy the hook runs per replica: the mirrored masks are pruned once.
        return runtime.call_once_cross_replica(self._step_end, iterations)

    def _step_end(self, iterations):
        should, sparsity = self.sparsity_schedule(tf.cast(iterations, tf.int64))
        return tf.cond(
            tf.cast(should, tf.bool), lambda: self._prune(sparsity), lambda: tf.constant(False)
        )

    def prune_to(self, sparsity):
        """Sets the masks at `sparsity` now (eagerly) and zeroes the weights.

        Args:
            sparsity: fraction of the prunable weights to zero, in [0, 1).

        Returns:
            `weight_sparsity` of the masks afterwards.
        """
        sparsity = checks.check_fraction("sparsity", sparsity, low_inclusive=True)
        self._prune(tf.constant(sparsity, tf.float64))
        return self.sparsity()

    def sparsity(self):
        """`{"pruned", "total", "sparsity", "layers"}` of the masks now (see `weight_sparsity`)."""
        layers, pruned, total = {}, 0, 0
        for target in self._targets.items:
            values = keras.ops.convert_to_numpy(target.mask)
            zeros = int(np.sum(values < 0.5))
            layers[target.path] = zeros / values.size
            pruned += zeros
            total += int(values.size)
        return {"pruned": pruned, "total": total, "sparsity": pruned / total, "layers": layers}

    def get_config(self):
        """The schedule and scope; not the model (see `from_student_config`)."""
        schedule = self.sparsity_schedule
        if not hasattr(schedule, "get_config") or keras.saving.get_registered_name(
            type(schedule)
        ) == type(schedule).__name__:
            raise NotImplementedError(
                f"WeightPruner.get_config: schedule {schedule!r} is not a registered Keras "
                "serializable (use a tfkdp.schedules schedule)"
            )
        return {
            "sparsity_schedule": keras.saving.serialize_keras_object(schedule),
            "scope": self.scope,
            "name": self.name,
        }

    @classmethod
    def from_student_config(cls, model, config):
        """Re-creates the pruner of `get_config` on `model` (e.g. a deserialized student)."""
        config = dict(config)
        config["sparsity_schedule"] = keras.saving.deserialize_keras_object(
            config["sparsity_schedule"]
        )
        return cls(model, **config)

    @classmethod
    def from_config(cls, config):
        raise ValueError(
            "WeightPruner prunes a model: re-create it with "
            "WeightPruner.from_student_config(model, config)"
        )


class _Targets:
    """A plain holder, so Keras does not track the model's variables a second time."""

    def __init__(self, items):
        self.items = list(items)


class WeightPruningCallback(keras.callbacks.Callback):
    """Drives a `WeightPruner` from `model.fit` (pruning without a teacher).

    Calls `pruner.on_train_step_end(model.optimizer.iterations)` after every
    batch. With `steps_per_execution > 1` Keras calls batch hooks once per
    execution, so the pruner then sees every `steps_per_execution`-th step
    only: pair it with a schedule whose frequency is a multiple of it (or
    prune through the `Distiller`, whose hook runs inside the step).

    Args:
        pruner: the `WeightPruner` of the model being trained.

    Example:
        >>> from tfkdp.pruning import unstructured
        >>> masked = unstructured.apply_weight_masks(model)
        >>> pruner = unstructured.WeightPruner(masked, 0.5)
        >>> masked.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> _ = masked.fit(train_ds, epochs=1, verbose=0,
        ...                callbacks=[unstructured.WeightPruningCallback(pruner)])
        >>> round(pruner.sparsity()["sparsity"], 2)
        0.5
    """

    def __init__(self, pruner):
        super().__init__()
        if not isinstance(pruner, WeightPruner):
            raise ValueError(f"pruner must be a WeightPruner; received {type(pruner).__name__}")
        self.pruner = pruner

    def on_train_batch_end(self, batch, logs=None):
        self.pruner.on_train_step_end(self.model.optimizer.iterations)

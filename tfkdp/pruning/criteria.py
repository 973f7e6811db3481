"""Channel importance criteria: how much each channel of a `ChannelGroup` matters.

A criterion scores a whole group of coupled channels (Torch-Pruning's
"group importance"): a channel of a residual group lives in the stem, in every
block's second conv and in the projection shortcuts, and all of them vote.
Scores are non-negative NumPy arrays of shape `(group.size,)`; higher means
more important. Scores of different groups are not on one scale; the pruner
normalises them per group before ranking across groups.

| name | score of channel c | needs data |
|---|---|---|
| `"l1"` | mean over the group's producer kernels of mean(abs(w)) of channel c's filter | no |
| `"l2"` | mean over the group's producer kernels of the RMS of channel c's filter | no |
| `"bn_gamma"` | mean over the group's batch norms of abs(γ_c) (network slimming) | no |
| `"taylor"` | first-order Taylor: abs(activation × gradient), summed over positions, averaged over batches | yes |
| `"fpgm"` | distance of channel c's (group-concatenated) filter to all others (geometric median) | no |
| `"hessian"` | label-free Hessian (Sony MCT's "LFH"): Hutchinson trace of JᵀJ over channel c's kernel entries × ‖w_c‖² / n_c | yes |
| `"random"` | uniform random (a baseline), seeded | no |

Per-element means (not sums) make a 1×1 shortcut kernel and a 3×3 kernel
count equally in a group.

Extension point: subclass `Criterion`, implement `score_group` (or `__call__`
for criteria that need a pass over data), and pass the instance wherever a
criterion name is accepted.
"""

import concurrent.futures
import zlib

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfkdp.checks import check_int
from tfkdp.pruning.analysis import get_weight

__all__ = [
    "Criterion",
    "L1",
    "L2",
    "BNGamma",
    "Taylor",
    "FPGM",
    "Hessian",
    "Random",
    "get",
    "names",
    "channel_matrix",
]

# Weights whose output-channel slices are "the filter" of a channel.
_KERNEL_ATTRS = ("kernel", "depthwise_kernel", "pointwise_kernel")


def channel_indices(ref, size):
    """Positions on `ref.axis` owned by each of the group's `size` channels.

    Returns:
        An int64 array of shape `(size, m)` (`ParamRef.indices`; `m` is
        `repeat · block`, 1 for a plain slice).
    """
    return np.asarray(ref.indices(int(size)), dtype=np.int64).reshape(int(size), -1)


def channel_matrix(value, ref, size):
    """Rows of a weight array grouped by channel.

    Args:
        value: the weight as an array-like.
        ref: a `tfkdp.ParamRef` (its `axis` and `indices`).
        size: number of channels of the group.

    Returns:
        A float64 array of shape `(size, n)`: row `c` holds every entry of
        the weight that belongs to channel `c`.
    """
    value = np.asarray(value, dtype=np.float64)
    moved = np.moveaxis(value, int(ref.axis), 0)
    rows = moved[channel_indices(ref, size).reshape(-1)]
    return rows.reshape(size, -1)


def _weight(model, ref):
    return get_weight(model, ref)


def _refs(group, attrs=None, trainable_only=False, model=None):
    refs = []
    for ref in group.out_params:
        if attrs is not None and ref.attr not in attrs:
            continue
        if trainable_only and not _weight(model, ref).trainable:
            continue
        refs.append(ref)
    return refs


class Criterion:
    """Base class: scores every channel of a `ChannelGroup`.

    Subclasses implement `score_group(model, group)`; criteria that need data
    (set `requires_data = True`) override `__call__` to make one pass over
    the data for all groups.
    """

    name = None
    requires_data = False

    def __call__(self, model, groups, data=None):
        """Scores of every group.

        Args:
            model: the model the groups belong to.
            groups: iterable of `ChannelGroup`.
            data: unused here; criteria with `requires_data` need it.

        Returns:
            A dict `group.id -> float64 array (group.size,)`, higher = more important.
        """
        del data  # data-free criteria ignore it
        return {group.id: self._checked(group, self.score_group(model, group)) for group in groups}

    def score_group(self, model, group):
        raise NotImplementedError(
            f"{type(self).__name__} must implement score_group(model, group) -> scores"
        )

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def _checked(self, group, scores):
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape != (group.size,):
            raise ValueError(
                f"{type(self).__name__} returned {scores.shape[0]} scores for group {group.id!r} "
                f"of size {group.size}"
            )
        return np.nan_to_num(scores, nan=0.0, posinf=np.finfo(np.float64).max)


def _kernel_matrices(model, group):
    refs = _refs(group, attrs=_KERNEL_ATTRS) or _refs(group, trainable_only=True, model=model)
    if not refs:
        raise ValueError(f"group {group.id!r} has no weights on its channels to score")
    return [channel_matrix(keras.ops.convert_to_numpy(_weight(model, r)), r, group.size) for r in refs]


def l1_scores(matrices):
    """Mean over matrices of each row's mean absolute value."""
    return np.mean([np.mean(np.abs(m), axis=1) for m in matrices], axis=0)


def l2_scores(matrices):
    """Mean over matrices of each row's root mean square."""
    return np.mean([np.sqrt(np.mean(np.square(m), axis=1)) for m in matrices], axis=0)


def fpgm_scores(matrices):
    """Sum of Euclidean distances of each row (rows concatenated over matrices) to all rows."""
    rows = np.concatenate(matrices, axis=1)
    sq = np.sum(rows**2, axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
    return np.sum(np.sqrt(dist2), axis=1)


@keras.saving.register_keras_serializable(package="tfkdp")
class L1(Criterion):
    """Mean absolute value of each channel's filters (Li et al. 2017).

    Reference:
        Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017.
    """

    name = "l1"

    def score_group(self, model, group):
        return l1_scores(_kernel_matrices(model, group))


@keras.saving.register_keras_serializable(package="tfkdp")
class L2(Criterion):
    """Root mean square of each channel's filters."""

    name = "l2"

    def score_group(self, model, group):
        return l2_scores(_kernel_matrices(model, group))


@keras.saving.register_keras_serializable(package="tfkdp")
class BNGamma(Criterion):
    """|γ| of the batch norms on the group's channels (network slimming).

    A group with no batch-norm scale (no BN, or `scale=False`) is scored by
    `L1` instead; that fallback is logged.

    Reference:
        Liu et al., "Learning Efficient Convolutional Networks through Network
        Slimming", ICCV 2017.
    """

    name = "bn_gamma"

    def score_group(self, model, group):
        refs = _refs(group, attrs=("gamma",))
        if not refs:
            logging.info("bn_gamma: group %r has no batch-norm scale; scored by L1", group.id)
            return L1().score_group(model, group)
        mats = [channel_matrix(keras.ops.convert_to_numpy(_weight(model, r)), r, group.size) for r in refs]
        return np.mean([np.mean(np.abs(m), axis=1) for m in mats], axis=0)


@keras.saving.register_keras_serializable(package="tfkdp")
class FPGM(Criterion):
    """Distance to the geometric median of the group's filters (He et al. 2019).

    Channel c's filter is the concatenation of its slices in every producer
    kernel of the group; its score is the sum of Euclidean distances to all
    other filters. The filters closest to the geometric median are the most
    replaceable and score lowest.

    Reference:
        He et al., "Filter Pruning via Geometric Median for Deep Convolutional
        Neural Networks Acceleration", CVPR 2019.
    """

    name = "fpgm"

    def score_group(self, model, group):
        return fpgm_scores(_kernel_matrices(model, group))


@keras.saving.register_keras_serializable(package="tfkdp")
class Random(Criterion):
    """Uniform random scores, a baseline; the same `seed` gives the same scores.

    Args:
        seed: integer seed; each group draws from `(seed, crc32(group.id))`
            so a group's scores do not depend on which other groups are scored.
    """

    name = "random"

    def __init__(self, seed=0):
        if isinstance(seed, bool) or not isinstance(seed, int):  # any integer, negative too
            raise ValueError(f"seed must be an integer; received seed={seed!r}")
        self.seed = seed

    def score_group(self, model, group):
        del model  # random by definition
        rng = np.random.default_rng([self.seed, zlib.crc32(group.id.encode())])
        return rng.uniform(size=group.size)

    def get_config(self):
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="tfkdp")
class Taylor(Criterion):
    """First-order Taylor importance: |activation × gradient| (Molchanov et al.).

    For every layer whose weights produce or scale the group's channels (conv,
    dense, depthwise, batch norm), the activation a_c of channel c at that
    layer's output satisfies Σ_positions a_c·∂L/∂a_c = Σ_θ∈channel c θ·∂L/∂θ
    (the layer is affine in its per-channel parameters θ), so the score is
    computed from weight gradients: no intermediate outputs are needed, and
    nested models work. Per batch, |Σ θ·∂L/∂θ| is summed over the batch and
    positions; scores average over batches and over the group's layers. The
    model runs with `training=False`, so batch norm uses its moving
    statistics (in training mode BN makes the conv's score identically zero).

    Args:
        loss: `loss(y_true, logits) -> scalar`; defaults to sparse categorical
            cross-entropy on logits.
        num_batches: at most this many batches of `data` are used (>= 1).
        batch_size: batch size when `data` is a tuple of arrays.

    Reference:
        Molchanov et al., "Pruning Convolutional Neural Networks for Resource
        Efficient Inference", ICLR 2017.
    """

    name = "taylor"
    requires_data = True

    def __init__(self, loss=None, num_batches=16, batch_size=64):
        check_int("num_batches", num_batches, 1)
        check_int("batch_size", batch_size, 1)
        self.loss = loss
        self.num_batches = num_batches
        self.batch_size = batch_size

    def get_config(self):
        return {
            "loss": keras.losses.serialize(self.loss) if self.loss is not None else None,
            "num_batches": self.num_batches,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("loss") is not None:
            config["loss"] = keras.losses.deserialize(config["loss"])
        return cls(**config)

    def score_group(self, model, group):
        raise ValueError("Taylor needs data: call criterion(model, groups, data=...)")

    def __call__(self, model, groups, data=None):
        return _outside_strategy(model, lambda m: self._scores(m, groups, data))

    def _scores(self, model, groups, data=None):
        groups = list(groups)
        if data is None:
            raise ValueError(
                "The 'taylor' criterion needs data (a tf.data.Dataset of (x, y) or a tuple "
                "(x, y) of arrays); received data=None"
            )
        dataset = _as_dataset(data, self.batch_size)
        loss_fn = self.loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        # One slot per (group, layer): the refs of one layer are summed inside the abs.
        variables, slots = [], []
        var_index = {}
        for group in groups:
            by_layer = {}
            for ref in group.out_params:
                var = _weight(model, ref)
                if not var.trainable:
                    continue
                key = (ref.layer, ref.attr)
                if key not in var_index:
                    var_index[key] = len(variables)
                    variables.append(var)
                by_layer.setdefault(ref.layer, []).append((var_index[key], ref))
            if not by_layer:
                raise ValueError(f"group {group.id!r} has no trainable weights to score")
            slots.append((group, list(by_layer.values())))

        totals = {group.id: np.zeros(group.size) for group in groups}
        batches = 0
        for batch in dataset.take(self.num_batches):
            x, y = batch[0], batch[1]
            with tf.GradientTape() as tape:
                logits = model(x, training=False)
                loss = loss_fn(y, logits)
            grads = tape.gradient(loss, [v.value for v in variables])
            products = [
                None if g is None else keras.ops.convert_to_numpy(v.value * g)
                for v, g in zip(variables, grads, strict=True)
            ]
            for group, layers in slots:
                per_layer = []
                for refs in layers:
                    total = np.zeros(group.size)
                    for index, ref in refs:
                        if products[index] is not None:
                            total += channel_matrix(products[index], ref, group.size).sum(axis=1)
                    per_layer.append(np.abs(total))
                totals[group.id] += np.mean(per_layer, axis=0)
            batches += 1
        if batches == 0:
            raise ValueError("The 'taylor' criterion received an empty dataset")
        return {group.id: self._checked(group, totals[group.id] / batches) for group in groups}


def _outside_strategy(model, score):
    """`score(model)`, on a plain copy of `model` when a `tf.distribute` strategy is in scope.

    Eager gradients of a strategy's variables are refused outside a replica
    context ("DistributedVariable.handle is not available outside the replica
    context"), which is where a method scores channels under `--strategy`.
    The strategy scope is thread-local: a copy built in another thread has
    ordinary variables, with the same layer names and weights, so the scores
    are those of the model. Every worker scores the same data alike.
    """
    if not tf.distribute.has_strategy():
        return score(model)
    weights = model.get_weights()

    def run():
        copy = keras.models.clone_model(model)
        copy.set_weights(weights)
        return score(copy)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


def _as_dataset(data, batch_size):
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) >= 2:
        return tf.data.Dataset.from_tensor_slices(tuple(data[:2])).batch(batch_size)
    raise ValueError(
        f"data must be a tf.data.Dataset of (x, y) batches or a tuple (x, y) of arrays; "
        f"received {type(data).__name__}"
    )


@keras.saving.register_keras_serializable(package="tfkdp")
class Hessian(Criterion):
    """Label-free second-order importance: the Hessian trace of the outputs per channel.

    The label-free Hessian of Sony's Model Compression Toolkit (MCT, its
    pruning importance metric "LFH"): with J the Jacobian of the model's
    output (the logits, for every example of a batch) with respect to a
    kernel W, the Gauss-Newton matrix JᵀJ is the Hessian of ½‖f(W) − f(W₀)‖²
    at W₀, a curvature that needs no labels. Its trace over channel c's
    entries, t_c = Σ_{w ∈ c} Σ_o (∂f_o/∂w)², is estimated with Hutchinson's
    method: for random vectors v with E[vvᵀ] = I (Rademacher here),
    E_v[(∂(v·f)/∂w)²] = Σ_o (∂f_o/∂w)². As in MCT, the score of channel c of
    one kernel is t_c · ‖W_c‖² / n_c (n_c: the entries of channel c), the
    second-order estimate of the output change when channel c is zeroed, per
    parameter. Scores are averaged over batches and probes, then over the
    group's producer kernels (a group with no kernel is scored from its other
    trainable weights). The model runs with `training=False` (batch norm
    uses its moving statistics).

    Cost: one forward pass per batch and `num_probes` backward passes
    (per batch) for all groups at once.

    Args:
        num_batches: at most this many batches of `data` are used (>= 1).
        num_probes: Hutchinson probe vectors per batch (>= 1).
        seed: seed of the probe vectors; the same seed and data give the
            same scores.
        batch_size: batch size when `data` is a tuple of arrays.

    Reference:
        Sony Model Compression Toolkit (github.com/sony/model_optimization),
        `LFHImportanceMetric` and `WeightsHessianScoresCalculatorKeras`
        (label-free Hessian, Hutchinson's trace estimator); Hutchinson, "A
        stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines", 1990.
    """

    name = "hessian"
    requires_data = True

    def __init__(self, num_batches=4, num_probes=8, seed=0, batch_size=64):
        check_int("num_batches", num_batches, 1)
        check_int("num_probes", num_probes, 1)
        check_int("batch_size", batch_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; received seed={seed!r}")
        self.num_batches = num_batches
        self.num_probes = num_probes
        self.seed = seed
        self.batch_size = batch_size

    def get_config(self):
        return {
            "num_batches": self.num_batches, "num_probes": self.num_probes, "seed": self.seed,
            "batch_size": self.batch_size,
        }  # fmt: skip

    def score_group(self, model, group):
        raise ValueError("Hessian needs data: call criterion(model, groups, data=...)")

    def __call__(self, model, groups, data=None):
        return _outside_strategy(model, lambda m: self._scores(m, groups, data))

    def _scores(self, model, groups, data=None):
        groups = list(groups)
        if data is None:
            raise ValueError(
                "The 'hessian' criterion needs data (a tf.data.Dataset of (x, y) or a tuple "
                "(x, y) of arrays; labels are not used); received data=None"
            )
        dataset = _as_dataset(data, self.batch_size)
        variables, var_index, slots = [], {}, []
        for group in groups:
            refs = _refs(group, attrs=_KERNEL_ATTRS) or _refs(group, trainable_only=True, model=model)
            refs = [r for r in refs if _weight(model, r).trainable]
            if not refs:
                raise ValueError(f"group {group.id!r} has no trainable weights to score")
            entries = []
            for ref in refs:
                key = (ref.layer, ref.attr)
                if key not in var_index:
                    var_index[key] = len(variables)
                    variables.append(_weight(model, ref))
                entries.append((var_index[key], ref))
            slots.append((group, entries))

        watched = [v.value for v in variables]
        num_probes = self.num_probes

        @tf.function(reduce_retracing=True)
        def squared_grads(x, seed):
            # One forward pass, `num_probes` backward passes through the kept tape.
            with tf.GradientTape(persistent=True) as tape:
                outputs = model(x, training=False)

            def body(p, totals):
                bits = tf.random.stateless_uniform(
                    tf.shape(outputs), seed=seed + tf.stack([0, p]), maxval=2, dtype=tf.int32
                )
                probe = tf.cast(2 * bits - 1, outputs.dtype)  # Rademacher: ±1, E[vvᵀ] = I
                grads = tape.gradient(outputs, watched, output_gradients=probe)
                return p + 1, [t if g is None else t + tf.square(g)
                               for t, g in zip(totals, grads, strict=True)]  # fmt: skip

            _, totals = tf.while_loop(
                lambda p, totals: p < num_probes, body,
                (tf.constant(0), [tf.zeros_like(w) for w in watched]),
            )  # fmt: skip
            return totals

        traces = [np.zeros(tuple(v.shape)) for v in variables]  # Σ over probes of (∂(v·f)/∂w)²
        probes = 0
        for step, batch in enumerate(dataset.take(self.num_batches)):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            seed = tf.constant([self.seed, step], dtype=tf.int32)
            for i, total in enumerate(squared_grads(x, seed)):
                traces[i] += keras.ops.convert_to_numpy(total).astype(np.float64)
            probes += num_probes
        if probes == 0:
            raise ValueError("The 'hessian' criterion received an empty dataset")
        scores = {}
        for group, entries in slots:
            per_kernel = []
            for index, ref in entries:
                trace = channel_matrix(traces[index] / probes, ref, group.size)
                weight = channel_matrix(keras.ops.convert_to_numpy(variables[index]), ref, group.size)
                per_kernel.append(
                    trace.sum(axis=1) * np.square(weight).sum(axis=1) / weight.shape[1]
                )
            scores[group.id] = self._checked(group, np.mean(per_kernel, axis=0))
        return scores


_REGISTRY = {cls.name: cls for cls in (L1, L2, BNGamma, Taylor, FPGM, Hessian, Random)}


def names():
    """The sorted names accepted by `get`."""
    return sorted(_REGISTRY)


def get(identifier, **kwargs):
    """A criterion from its name (or the instance itself).

    Args:
        identifier: one of `names()` or a `Criterion` instance.
        **kwargs: constructor arguments (e.g. `seed` for `"random"`).

    Returns:
        A `Criterion`.

    Raises:
        ValueError: for an unknown name, listing the valid ones.

    Example:
        >>> get("l1").name
        'l1'
    """
    if isinstance(identifier, Criterion):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _REGISTRY:
        return _REGISTRY[identifier.lower()](**kwargs)
    raise ValueError(f"Unknown criterion {identifier!r}; valid names are {names()}")

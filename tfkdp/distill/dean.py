"""The dean of DDSL: a meta-learned controller of the distillation and sparsity weights.

Three roles train together: the frozen teacher, the student (distilled and
pulled towards the channel-sparse set by ADMM), and the *dean*, which sets the
student's two supervision weights from two measured attributes of the student.

- **State** (measured in the compiled train step on a held-out batch):
  - distillability `d = 1 − exp(−KL(p_T ‖ p_S))` with `p = softmax(logits / τ)`
    at the distillation temperature τ, KL in nats averaged over the batch,
    for the *hard-pruned look-ahead student* (the network that would be
    deployed): 0 when it already matches the teacher, → 1 as the mismatch
    grows; a monotone map of KL ∈ [0, ∞) onto [0, 1);
  - sparsability `s = 1 − ‖W − Z‖² / ‖W‖²` over ADMM's groups (1 when the
    student already lies in the channel-sparse set; clipped to [0, 1]);
  - progress `p = step / total_steps` of the phase, in [0, 1].
- **Dean**: `w_k = w0_k + (max_k − min_k)·(σ(z_k) − σ(z0_k))`, `z = f·K + b`,
  `f = (d, s, p)`, clipped to `[min_k, max_k]`. With `K = 0` and `b = z0 =
  logit((w0 − min)/(max − min))` it returns the initial weights `w0` bit for
  bit (this is `min + (max − min)·σ(z)`, written relative to `w0` so that an
  unchanged dean reproduces fixed-weight KDP exactly). `K` (3×2) and `b` (2,)
  are the dean's learned parameters, saved in the checkpoint; they are held
  out of the student's optimizer (`Dean.trainable = False`) because they move
  by their own hypergradient rule.
- **Meta-update** every `dean_every` optimizer steps: one-step look-ahead
  `W' = W − η·∇_W L_train(W; w)` (η the optimizer's current learning rate,
  plain SGD step), meta-objective `L_meta` = task loss of the look-ahead
  student with the channels outside Z's support masked (hard-pruned), on the
  held-out batch, batch-norm in training mode (batch statistics, which is
  what BN re-estimation after the hard prune gives; nothing is written to the
  moving statistics). `L_train` is linear in the weights, so
  `∂L_meta/∂w_k = −η·⟨∇_{W'} L_meta, ∇_W L_k(W)⟩` exactly, with `L_distill =
  Σ_i distill_i` and `L_sparsity` the ADMM penalty (per-term gradients of one
  forward pass). The chain rule through the dean gives `G = ∂L_meta/∂(K, b)`;
  the dean takes a normalised step `θ ← θ − dean_lr·G/‖G‖` (the raw
  hypergradient scales with η·‖g‖², which spans orders of magnitude across
  models and phases; `dean_lr` is the step length in the dean's parameter
  space), then re-evaluates the weights at the new state and assigns them to
  the `Distiller`'s `distillation_loss_weights` and `sparsity_weight`.

The held-out batch lives in non-trainable variables of the dean, refreshed at
each epoch start by `ValidationBatch` (batch `epoch mod n` of the validation
set, with the teacher's logits for it). Why not an iterator in the step: a
dataset iterator cannot be read inside an XLA-compiled step, under
`steps_per_execution > 1` the step runs many times per Python call, and under
`MirroredStrategy` every replica would need the same batch; a variable is
read by all of them, the callback runs eagerly between executions, and a
resumed run refreshes the same batch for the same epoch.

Under `tf.distribute` the meta-step runs once, cross-replica (a
`merge_call`, like ADMM's Z/U update): the replicas' training shards are
concatenated into the global batch and the dean's state is written to every
replica.

Reference:
    Liu, Cao, Li, Hu, Maybank, "Learning to explore distillability and
    sparsability: a joint framework for model compression", IEEE TPAMI
    45(3), 2023 (teacher, student and dean; meta-learned weights of the
    distillation and sparsity supervision). The attributes' definitions, the
    dean's form, the meta-objective and the look-ahead are ours (its full text
    was not available). Look-ahead hypergradients: Baydin et al., "Online
    learning rate adaptation with hypergradient descent", ICLR 2018; Liu,
    Simonyan & Yang, "DARTS", ICLR 2019 (first-order one-step unrolling).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from tfkdp import checks
from tfkdp.distill.distiller import Distiller

__all__ = ["Dean", "DeanDistiller", "ValidationBatch", "DeanTrace"]

_FEATURES = ("distillability", "sparsability", "progress")
_AGG = "only_first_replica"


def _check_range(name, low, high, initial):
    low = checks.check_number(f"{name}_min", low, 0)
    high = checks.check_number(f"{name}_max", high, 0, strict=True)
    if not low < high:
        raise ValueError(
            f"{name}_min must be < {name}_max; received {name}_min={low}, {name}_max={high}"
        )
    if not low < initial < high:
        raise ValueError(
            f"the initial {name} weight {initial} must lie strictly inside ({name}_min, "
            f"{name}_max) = ({low}, {high}); received {name}_max={high}"
        )
    return float(low), float(high)


@keras.saving.register_keras_serializable(package="tfkdp")
class Dean(keras.layers.Layer):
    """The dean's parameters, its state and the held-out batch (see the module docstring).

    Args:
        val_batch: one `(x, y)` batch of the validation set (fixes the
            shapes and dtypes of the held-out batch; its values are replaced
            by `ValidationBatch` at each epoch start).
        total_steps: optimizer steps of the phase (progress = step / this).
        initial_weights: `(w_distill, w_sparsity)` at the start (the fixed
            weights of KDP).
        dean_every: optimizer steps between meta-updates (>= 1).
        dean_lr: step length of the dean's normalised update (>= 0; 0 freezes
            the dean, which then reproduces fixed-weight KDP).
        distill_min, distill_max: bounds of `w_distill` (0 <= min < max).
        sparsity_min, sparsity_max: bounds of `w_sparsity` (0 <= min < max).
        temperature: τ of the distillability's softmax.

    Raises:
        ValueError: `dean_every < 1`, `dean_lr < 0`, bounds reversed or
            non-positive, an initial weight outside its bounds, or a bad batch.

    Reference:
        Liu et al., "Learning to explore distillability and sparsability",
        IEEE TPAMI 2023 (the dean); its form here is ours.
    """

    def __init__(self, val_batch, total_steps, initial_weights=(0.5, 1.0), dean_every=10,
                 dean_lr=0.05, distill_min=0.0, distill_max=2.0, sparsity_min=0.0,
                 sparsity_max=2.0, temperature=4.0, name="dean", **kwargs):  # fmt: skip
        super().__init__(name=name, **kwargs)
        self.dean_every = checks.check_int("dean_every", dean_every, 1)
        self.dean_lr = float(checks.check_number("dean_lr", dean_lr, 0))
        self.total_steps = checks.check_int("total_steps", total_steps, 1)
        self.temperature = float(checks.check_number("temperature", temperature, 0, strict=True))
        w0 = [float(w) for w in initial_weights]
        self.bounds = (
            _check_range("distill", distill_min, distill_max, w0[0]),
            _check_range("sparsity", sparsity_min, sparsity_max, w0[1]),
        )
        self.initial_weights = tuple(w0)
        if not isinstance(val_batch, (tuple, list)) or len(val_batch) < 2:
            raise ValueError(
                f"val_batch must be an (x, y) batch of the validation set; received {val_batch!r}"
            )
        vx, vy = (np.asarray(keras.ops.convert_to_numpy(v)) for v in val_batch[:2])
        z0 = [math.log((w - lo) / (hi - w)) for w, (lo, hi) in zip(w0, self.bounds, strict=True)]
        self.kernel = self.add_weight(
            shape=(len(_FEATURES), 2), initializer="zeros", name="kernel", aggregation=_AGG
        )
        self.bias = self.add_weight(
            shape=(2,), initializer=keras.initializers.Constant(z0), name="bias", aggregation=_AGG
        )

        def state(shape, name, dtype="float32", init="zeros"):
            return self.add_weight(
                shape=shape, dtype=dtype, initializer=init, trainable=False, name=name, aggregation=_AGG
            )  # fmt: skip

        self.bias_initial = state((2,), "bias_initial", init=keras.initializers.Constant(z0))
        self.features = state((len(_FEATURES),), "features")  # the state that set the weights
        self.loss_weights = state((2,), "loss_weights", init=keras.initializers.Constant(w0))
        self.hypergradient = state((2,), "hypergradient")
        self.meta_loss = state((), "meta_loss")
        self.updates = state((), "updates", dtype="int64")
        self.val_x = state(vx.shape, "val_x", dtype=str(vx.dtype))
        self.val_y = state(vy.shape, "val_y", dtype=str(vy.dtype))
        self.val_teacher = None  # created by `attach_teacher` (needs the teacher's output shape)
        self.trainable = False  # moved by the hypergradient rule, not by the student's optimizer
        self.built = True

    def attach_teacher(self, num_outputs):
        """Creates the variable of the teacher's logits on the held-out batch."""
        if self.val_teacher is None:
            self.val_teacher = self.add_weight(
                shape=(self.val_x.shape[0], num_outputs), initializer="zeros", trainable=False,
                name="val_teacher", aggregation=_AGG,
            )  # fmt: skip

    def get_config(self):
        raise NotImplementedError(
            "Dean holds a held-out batch; re-create it with Dean(val_batch, total_steps, ...)"
        )

    def weights_at(self, features, kernel=None, bias=None):
        """`(w_distill, w_sparsity)` (float32 (2,)) for a state `(d, s, p)`."""
        kernel = self.kernel.value if kernel is None else kernel
        bias = self.bias.value if bias is None else bias
        z = tf.linalg.matvec(kernel, tf.cast(features, tf.float32), transpose_a=True) + bias
        low = tf.constant([b[0] for b in self.bounds], tf.float32)
        high = tf.constant([b[1] for b in self.bounds], tf.float32)
        w0 = tf.constant(self.initial_weights, tf.float32)
        w = w0 + (high - low) * (tf.sigmoid(z) - tf.sigmoid(self.bias_initial.value))
        return tf.clip_by_value(w, low, high)

    def step(self, hypergradient, new_features):
        """One meta-update: chain rule, normalised step, new weights (float32 (2,))."""
        if self.dean_lr > 0:
            kernel, bias = tf.identity(self.kernel.value), tf.identity(self.bias.value)
            with tf.GradientTape() as tape:
                tape.watch([kernel, bias])
                w = self.weights_at(self.features.value, kernel, bias)
                surrogate = tf.reduce_sum(tf.stop_gradient(hypergradient) * w)
            g_kernel, g_bias = tape.gradient(surrogate, [kernel, bias])
            norm = tf.sqrt(tf.reduce_sum(tf.square(g_kernel)) + tf.reduce_sum(tf.square(g_bias)))
            scale = self.dean_lr / (norm + 1e-12)
            self.kernel.assign(kernel - scale * g_kernel)
            self.bias.assign(bias - scale * g_bias)
        self.features.assign(tf.cast(new_features, tf.float32))
        weights = self.weights_at(self.features.value)
        self.loss_weights.assign(weights)
        self.hypergradient.assign(tf.cast(hypergradient, tf.float32))
        self.updates.assign_add(1)
        return weights

    def logs(self):
        """The dean's state in force (for History/TensorBoard)."""
        return {
            "dean_distillability": self.features[0],
            "dean_sparsability": self.features[1],
            "dean_progress": self.features[2],
            "dean_w_distill": self.loss_weights[0],
            "dean_w_sparsity": self.loss_weights[1],
            "dean_meta_loss": self.meta_loss.value,
        }


def _numpy(variable):
    """A Keras variable's value as a NumPy array, also under a (multi-worker) strategy.

    `keras.ops.convert_to_numpy` of a `MultiWorkerMirroredStrategy` variable
    fails ("object __array__ method not producing an array"); its `numpy()`
    reads the local copy, which every worker holds equal.
    """
    value = variable.value if hasattr(variable, "value") else variable
    return np.asarray(value.numpy() if hasattr(value, "numpy") else keras.ops.convert_to_numpy(value))


def _concat_replicas(strategy, value):
    """The global batch of per-replica `value`: every replica's shard, on every worker."""
    if value is None:
        return None
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # The local replicas hold this worker's share only: gather every worker's.
        return keras.tree.map_structure(lambda v: strategy.gather(v, axis=0), value)
    return keras.tree.map_structure(
        lambda v: tf.concat(strategy.experimental_local_results(v), axis=0), value
    )


@keras.saving.register_keras_serializable(package="tfkdp")
class DeanDistiller(Distiller):
    """A `Distiller` whose distillation and sparsity weights a `Dean` sets (DDSL).

    The train step is the `Distiller`'s, followed (every `dean.dean_every`
    optimizer steps, counted on `optimizer.iterations`) by the dean's
    meta-update on the held-out batch: hypergradients of the look-ahead
    hard-pruned student (`hypergradients`), the dean's step, and the new
    weights assigned to `distillation_loss_weights` (all of them) and
    `sparsity_weight`. Extra metrics: `dean_distillability`,
    `dean_sparsability`, `dean_progress`, `dean_w_distill`,
    `dean_w_sparsity`, `dean_meta_loss` (the values in force).

    Args:
        teacher, student: as for `Distiller`.
        dean: a `Dean`.
        sparsity: an ADMM term (`tfkdp.ADMM`): the hard prune uses its Z
            support, the sparsability its W − Z.
        **kwargs: passed to `Distiller` (`distillation_losses`,
            `student_loss_weight`, ...); every distillation loss weight must
            start equal (the dean sets one `w_distill` for all).

    Raises:
        ValueError: without an ADMM sparsity term or a `Dean`, or with
            unequal initial distillation weights.

    Example:
        >>> from tfkdp.distill.dean import Dean, DeanDistiller
        >>> keep = {g.id: g.size // 2 for g in tfkdp.channel_groups(student) if g.prunable}
        >>> admm = tfkdp.ADMM(student, keep)
        >>> dean = Dean(next(iter(val_ds)), total_steps=8, dean_every=2)
        >>> distiller = DeanDistiller(teacher, student, dean, sparsity=admm)

    Reference:
        Liu et al., "Learning to explore distillability and sparsability",
        IEEE TPAMI 2023.
    """

    def __init__(self, teacher, student, dean=None, sparsity=None, **kwargs):
        if not isinstance(dean, Dean):
            raise ValueError(f"dean must be a tfkdp.distill.dean.Dean; received dean={dean!r}")
        if sparsity is None or not hasattr(sparsity, "support_multipliers"):
            raise ValueError(
                "DeanDistiller needs an ADMM sparsity term (tfkdp.ADMM); received "
                f"sparsity={sparsity!r}"
            )
        super().__init__(teacher, student, sparsity=sparsity, **kwargs)
        weights = [float(keras.ops.convert_to_numpy(w)) for w in self.distillation_loss_weights]
        if len(set(weights)) != 1:
            raise ValueError(
                "the dean sets one distillation weight for every loss; received unequal "
                f"distillation_loss_weights={weights}"
            )
        self.dean = dean
        dean.attach_teacher(int(student.output.shape[-1]))

    def get_config(self):
        raise NotImplementedError("DeanDistiller is a training object; save its student instead")

    # ------------------------------------------------------------ meta-step
    def hypergradients(self, x, y, sample_weight=None):
        """∂L_meta/∂(w_distill, w_sparsity) at the current weights, and the state.

        Args:
            x, y, sample_weight: the training batch of the look-ahead step
                (global batch).

        Returns:
            A dict of float32 tensors: `hypergradient` (2,), `meta_loss`,
            `distillability`, `sparsability`.
        """
        variables = self.student.trainable_variables
        values = [tf.identity(v.value) for v in variables]
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(values)
            with keras.StatelessScope(state_mapping=list(zip(variables, values, strict=True))):
                y_pred, s_feats, t_feats = self._forward(x, training=True)
                total, parts = self._objective(x, y, y_pred, s_feats, t_feats, sample_weight)
            distill = tf.add_n(parts["terms"])
            sparsity = parts["sparsity"]
        g_total = tape.gradient(total, values)
        g_distill = tape.gradient(distill, values)
        g_sparsity = tape.gradient(sparsity, values)
        del tape
        eta = tf.cast(self.optimizer.learning_rate, tf.float32)
        multipliers = {id(v): m for v, m in self.sparsity.support_multipliers()}
        lookahead = [w if g is None else w - eta * g for w, g in zip(values, g_total, strict=True)]
        dean = self.dean
        with tf.GradientTape() as tape:
            tape.watch(lookahead)
            pruned = [
                w * tf.cast(multipliers[id(v)], w.dtype) if id(v) in multipliers else w
                for v, w in zip(variables, lookahead, strict=True)
            ]  # fmt: skip
            with keras.StatelessScope(state_mapping=list(zip(variables, pruned, strict=True))):
                logits = self.student(dean.val_x.value, training=True)
            meta = tf.cast(self._compile_loss(dean.val_y.value, logits), tf.float32)
            meta = meta * float(tf.distribute.get_strategy().num_replicas_in_sync)
        g_meta = tape.gradient(meta, lookahead)

        def dot(a_list, b_list):
            total = tf.constant(0.0, tf.float32)
            for a, b in zip(a_list, b_list, strict=True):
                if a is not None and b is not None:
                    total = total + tf.reduce_sum(tf.cast(a, tf.float32) * tf.cast(b, tf.float32))
            return total

        hyper = tf.stack([-eta * dot(g_meta, g_distill), -eta * dot(g_meta, g_sparsity)])
        tau = dean.temperature
        log_p_t = tf.nn.log_softmax(tf.cast(dean.val_teacher.value, tf.float32) / tau)
        log_p_s = tf.nn.log_softmax(tf.cast(logits, tf.float32) / tau)
        kl = tf.reduce_mean(tf.reduce_sum(tf.exp(log_p_t) * (log_p_t - log_p_s), axis=-1))
        distillability = 1.0 - tf.exp(-tf.maximum(kl, 0.0))
        sparsability = tf.clip_by_value(1.0 - self.sparsity.relative_distance(), 0.0, 1.0)
        return {
            "hypergradient": hyper, "meta_loss": tf.stop_gradient(meta),
            "distillability": tf.stop_gradient(distillability), "sparsability": sparsability,
        }  # fmt: skip

    def _meta_update(self, x, y, sample_weight, iterations):
        step = tf.cast(iterations, tf.int64)
        due = tf.equal(tf.math.floormod(step, self.dean.dean_every), 0)

        def update():
            out = self.hypergradients(x, y, sample_weight)
            progress = tf.minimum(tf.cast(step, tf.float32) / float(self.dean.total_steps), 1.0)
            features = tf.stack([out["distillability"], out["sparsability"], progress])
            self.dean.meta_loss.assign(out["meta_loss"])
            weights = self.dean.step(out["hypergradient"], features)
            for variable in self.distillation_loss_weights:
                variable.assign(weights[0])
            self.sparsity_weight.assign(weights[1])
            return tf.constant(True)

        return tf.cond(due, update, lambda: tf.constant(False))

    def train_step(self, data):
        logs = super().train_step(data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        iterations = self.optimizer.iterations
        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            # Once, cross-replica (as ADMM's Z/U update): the replicas' shards form the
            # global batch, and every replica receives the same dean state.
            def merge_fn(strategy, x, y, sample_weight, iterations):
                return self._meta_update(
                    _concat_replicas(strategy, x), _concat_replicas(strategy, y),
                    _concat_replicas(strategy, sample_weight),
                    strategy.experimental_local_results(iterations)[0],
                )  # fmt: skip

            tf.distribute.get_replica_context().merge_call(
                merge_fn, args=(x, y, sample_weight, iterations)
            )
        else:
            self._meta_update(x, y, sample_weight, iterations)
        logs = dict(logs)
        logs.update(self.dean.logs())
        return logs


class ValidationBatch(keras.callbacks.Callback):
    """Refreshes the dean's held-out batch at each epoch start: batch `epoch mod n`.

    Only batches of the first batch's size are used (a smaller last batch is
    skipped). The teacher's logits for the batch are stored with it.

    Args:
        dean: the `Dean`.
        teacher: the teacher model (its first output is the logits).
        val_data: a finite, batched `tf.data.Dataset` of `(x, y)`.

    Raises:
        ValueError: if `val_data` is None or has no full batch.
    """

    def __init__(self, dean, teacher, val_data):
        super().__init__()
        if val_data is None:
            raise ValueError("ValidationBatch needs validation data; received val_data=None")
        self.dean = dean
        self.teacher = teacher
        self.val_data = val_data
        size = int(dean.val_x.shape[0])
        self._full = val_data.filter(
            lambda x, *rest: tf.equal(tf.shape(keras.tree.flatten(x)[0])[0], size)
        )
        self._count = int(self._full.reduce(0, lambda n, _: n + 1))
        if not self._count:
            raise ValueError(f"val_data has no batch of {size} examples")

    def on_epoch_begin(self, epoch, logs=None):
        x, y = next(iter(self._full.skip(epoch % self._count).take(1)))[:2]
        self.dean.val_x.assign(tf.cast(x, self.dean.val_x.dtype))
        self.dean.val_y.assign(tf.cast(y, self.dean.val_y.dtype))
        logits = self.teacher(x, training=False)
        self.dean.val_teacher.assign(tf.cast(keras.tree.flatten(logits)[0], tf.float32))


class DeanTrace(keras.callbacks.Callback):
    """Records the dean's state at each meta-update (for `Pruned.record` and `dean.png`).

    `trace` holds lists keyed `step`, `distillability`, `sparsability`,
    `progress`, `w_distill`, `w_sparsity`, `hypergradient_distill`,
    `hypergradient_sparsity`, `meta_loss`, one entry per meta-update seen at
    a batch end (under `steps_per_execution > 1`, the last of each execution).
    """

    def __init__(self, dean):
        super().__init__()
        self.dean = dean
        self.trace = {k: [] for k in (
            "step", "distillability", "sparsability", "progress", "w_distill", "w_sparsity",
            "hypergradient_distill", "hypergradient_sparsity", "meta_loss")}  # fmt: skip
        self._seen = -1

    def on_train_batch_end(self, batch, logs=None):
        updates = int(_numpy(self.dean.updates))
        if updates == self._seen:
            return
        self._seen = updates
        f = _numpy(self.dean.features)
        w = _numpy(self.dean.loss_weights)
        h = _numpy(self.dean.hypergradient)
        step = int(_numpy(self.model.optimizer.iterations))
        row = (step, f[0], f[1], f[2], w[0], w[1], h[0], h[1], _numpy(self.dean.meta_loss))
        for key, value in zip(self.trace, row, strict=True):
            self.trace[key].append(int(value) if key == "step" else float(value))

    def subsampled(self, points=200):
        """The trace with at most `points` entries per series (evenly spaced, last kept)."""
        n = len(self.trace["step"])
        if n <= points:
            return {k: list(v) for k, v in self.trace.items()}
        idx = sorted(set(np.linspace(0, n - 1, points).round().astype(int).tolist()))
        return {k: [v[i] for i in idx] for k, v in self.trace.items()}

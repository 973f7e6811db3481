"""ADMM for structured (channel) sparsity, run inside the compiled train step.

Problem: minimise `loss(W)` subject to each prunable group keeping at most
`k_g` non-zero channels. ADMM splits it with an auxiliary copy `Z` that lies in
the constraint set and a scaled dual `U` (Boyd et al. 2011, §3.1.1):

    W ← a few optimizer steps on  loss(W) + ρ/2 · Σ‖W − Z + U‖²
    Z ← Π_k(W + U)            (keep the k channels of largest norm, zero the rest)
    U ← U + W − Z

Π_k ranks channels by the L2 norm of *all* the group's trainable channel
weights together (every producer kernel, bias, batch-norm γ and β), so coupled
channels are kept or dropped as one. `Z`, `U`, the current ρ, the step and
the keep masks are non-trainable variables of this layer: a checkpoint of the
`Distiller` (which tracks its `sparsity` layer) carries them, and a resumed run
continues exactly.

The Z/U update runs every `update_every` optimizer steps, counted from
`optimizer.iterations` (batch-end callbacks would miss steps under
`steps_per_execution > 1`), with `tf.cond` and TF ops only: no NumPy round
trip, so it compiles with XLA and runs on a GPU at full speed.

Reference:
    Liu et al., "Joint Deep Model Compression and Distillation ... (DDSL/KDP)",
    IEEE TPAMI 2023; Zhang et al., "A Systematic DNN Weight Pruning Framework
    using ADMM", ECCV 2018; Boyd et al., "Distributed Optimization and
    Statistical Learning via ADMM", 2011.
"""

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfkdp.checks import check_int
from tfkdp.pruning import criteria
from tfkdp.pruning.analysis import channel_groups, get_weight
from tfkdp.pruning.plan import PruningPlan
from tfkdp.pruning.sparsity import schedules
from tfkdp.train import runtime

__all__ = ["ADMM", "NORMALIZE", "check_normalize", "project_channels"]


def project_channels(values, axes, repeats, k):
    """Π_k: keeps the `k` channels of largest joint L2 norm, zeroes the others.

    Channel `c` owns, in `values[i]`, the `repeats[i]` consecutive entries
    `c·repeat … c·repeat + repeat − 1` along `axes[i]`. Ties go to the lower
    channel index (stable sort), so the result is deterministic.

    Args:
        values: list of tensors, the group's channel slices (all with the same
            number of channels).
        axes: channel axis of each tensor.
        repeats: entries per channel on that axis.
        k: number of channels to keep (scalar int tensor or int).

    Returns:
        `(projected, mask)`: the list of projected tensors and the float32
        keep mask of shape `(channels,)`.
    """
    norms = None
    for value, axis, repeat in zip(values, axes, repeats, strict=True):
        rank = len(value.shape)
        other = [a for a in range(rank) if a != axis]
        sq = tf.reduce_sum(tf.square(tf.cast(value, tf.float32)), axis=other) if other else tf.square(
            tf.cast(value, tf.float32)
        )
        sq = tf.reduce_sum(tf.reshape(sq, (-1, repeat)), axis=1)
        norms = sq if norms is None else norms + sq
    # rank[c] = position of channel c in descending-norm order (stable).
    order = tf.argsort(-norms, stable=True)
    ranks = tf.argsort(order, stable=True)
    mask = tf.cast(ranks < tf.cast(k, ranks.dtype), tf.float32)
    projected = []
    for value, axis, repeat in zip(values, axes, repeats, strict=True):
        rank = len(value.shape)
        shape = [1] * rank
        shape[axis] = -1
        expanded = tf.reshape(tf.repeat(mask, repeat), shape)
        projected.append(value * tf.cast(expanded, value.dtype))
    return projected, mask


class _Slot:
    """One trainable weight slice of a group: the weight, its Z and U."""

    def __init__(self, ref, variable, indices, axis, repeat, full):
        self.ref = ref
        self.variable = variable
        self.indices = indices  # flat positions on `axis`, or None when it is the whole axis
        self.axis = axis
        self.repeat = repeat
        self.full = full
        self.z = None
        self.u = None

    def read(self):
        value = self.variable.value
        if self.full:
            return value
        return tf.gather(value, self.indices, axis=self.axis)


NORMALIZE = (False, True, "mean")


def check_normalize(normalize):
    """`normalize` if it is one of `NORMALIZE`, else a `ValueError` listing them."""
    if not (isinstance(normalize, bool) or (isinstance(normalize, str) and normalize == "mean")):
        raise ValueError(
            f"normalize must be one of {list(NORMALIZE)}; received normalize={normalize!r}"
        )
    return normalize


@keras.saving.register_keras_serializable(package="tfkdp")
class ADMM(keras.layers.Layer):
    """ADMM channel-sparsity state and penalty, the `Distiller`'s `sparsity` term.

    Call it (no arguments) for the penalty ρ/2·Σ‖W − Z + U‖² (float32 scalar);
    the `Distiller` adds it to the loss inside its gradient tape and calls
    `on_train_step_end(optimizer.iterations)` after each optimizer update.

    Group g removes `round(P_g · min(1, s(t) / S))` channels at step t, where
    `P_g = size_g − keep_g` is its final number of removed channels, `s(t)` the
    sparsity of `sparsity_schedule` and `S = target_sparsity` the overall
    channel sparsity of the final plan (ΣP_g / Σsize_g). A schedule that ends
    at `target_sparsity` therefore ends exactly at the plan; the default
    `ConstantSparsity(target_sparsity)` projects onto the final sets from the
    first step (classic ADMM).

    Args:
        model: the student whose weights are regularised.
        keep: final number of kept channels per group, `{group_id: k}`, or a
            `PruningPlan` (its kept counts are used, not its indices: ADMM
            picks the channels). Groups not listed are not regularised.
        sparsity_schedule: `schedule(step) -> (should_prune, sparsity)`
            (tfmot's protocol; `tfkdp.pruning.sparsity.schedules` or tfmot's own).
            Its sparsity takes effect at the steps where `should_prune` is
            true and holds in between, as in tfmot; Z/U are re-projected every
            `update_every` steps at the sparsity in force.
        rho: ρ as a positive number or a callable `step -> rho`
            (`tfkdp.pruning.sparsity.schedules.ExponentialRho` ramps it). When ρ changes, U is
            rescaled by ρ_old/ρ_new (U is the dual divided by ρ).
        update_every: optimizer steps between Z/U updates (>= 1).
        normalize: `False` (the plain penalty), `True` or `"mean"`. `True`
            divides each group's term by the mean square ms_g of its
            regularised weights at construction (or `reset`), so the penalty
            is ρ/2·Σ_g ‖W_g − Z_g + U_g‖² / ms_g: a per-group ρ_g = ρ/ms_g. A
            kernel followed by batch norm computes the same function at any
            scale a, where the task gradient scales as 1/a and the raw
            penalty's as a; divided by ms_g both scale alike, so one ρ suits
            models whose weights differ in magnitude (a keras.applications
            model trained without weight decay and our zoo's). `"mean"` also
            divides by N, the number of regularised weights: the penalty is
            ρ/2 times the *mean* squared distance to the sparse set in units
            of each group's mean square, a number in [0, ~ρ/2] whatever the
            model's size (unitless; ρ_g = ρ/(ms_g·N)), so its value can be
            compared with the task loss on any model. U stays the scaled dual
            of each group's own ρ_g, so the Z/U updates do not change.
        groups: the model's `ChannelGroup`s (computed when omitted).
        name: layer name.

    Raises:
        ValueError: for an unknown or unprunable group id, a keep count outside
            [1, size], `update_every` < 1, or a bad ρ / schedule.

    Example:
        >>> admm = ADMM(student, {"stage1_block1_conv1": 4}, rho=1e-3, update_every=4)
        >>> distiller = tfkdp.Distiller(teacher, student, sparsity=admm)
        >>> admm.group_ids
        ['stage1_block1_conv1']

    Reference:
        Liu et al., DDSL (KDP), IEEE TPAMI 2023; Zhang et al., ECCV 2018.
    """

    def __init__(
        self,
        model,
        keep,
        sparsity_schedule=None,
        rho=1e-3,
        update_every=4,
        normalize=False,
        groups=None,
        name="admm",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        check_int("update_every", update_every, 1)
        if groups is None:
            groups = channel_groups(model)
        by_id = {g.id: g for g in groups}
        keep = _keep_counts(keep)
        self._model_name = model.name
        self.update_every = update_every
        self.normalize = check_normalize(normalize)
        self.rho_schedule = schedules.get_rho_schedule(rho)
        self._groups = []
        total, removed = 0, 0
        for gid, k in keep.items():
            if gid not in by_id:
                raise ValueError(
                    f"keep names group {gid!r}, which is not a channel group of model "
                    f"{model.name!r}; groups are {sorted(by_id)}"
                )
            group = by_id[gid]
            if not group.prunable:
                raise ValueError(f"group {gid!r} is not prunable ({group.reason}); remove it from keep")
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= group.size:
                raise ValueError(
                    f"keep[{gid!r}] must be an integer in [1, {group.size}]; received {k!r}"
                )
            if k == group.size:
                continue
            slots = []
            for ref in group.out_params:
                var = get_weight(model, ref)
                if not var.trainable:
                    continue  # BN moving statistics follow the kept channels by themselves
                axis = int(ref.axis) % len(var.shape)
                table = criteria.channel_indices(ref, group.size)
                repeat = table.shape[1]  # entries per channel (Flatten positions × depth multiplier)
                idx = table.reshape(-1)
                full = idx.size == var.shape[axis] and np.array_equal(idx, np.arange(idx.size))
                slots.append(_Slot(ref, var, None if full else tf.constant(idx), axis, repeat, full))
            if not slots:
                raise ValueError(f"group {gid!r} has no trainable channel weights to regularise")
            self._groups.append((group, int(k), slots))
            total += group.size
            removed += group.size - int(k)
        self.target_sparsity = removed / total if total else 0.0
        self.sparsity_schedule = schedules.get_sparsity_schedule(
            sparsity_schedule
            if sparsity_schedule is not None
            else schedules.ConstantSparsity(self.target_sparsity, 0, -1, 1)
        )

        # Mirrored strategies: every replica computes the same Z/U from the
        # same W, so writing from the first replica is exact.
        agg = "only_first_replica"
        self.step = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="step", aggregation=agg
        )
        self.rho = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="rho", aggregation=agg
        )
        # The sparsity in force: the schedule's value at its last `should_prune` step
        # (tfmot's protocol: between pruning steps the sparsity does not move).
        self.sparsity = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="sparsity", aggregation=agg
        )
        self._masks = []
        self._scales = []  # 1/ms_g with normalize=True, 1/(ms_g·N) with "mean", else 1
        for gi, (group, _, slots) in enumerate(self._groups):
            self._masks.append(
                self.add_weight(
                    shape=(group.size,), initializer="ones", trainable=False,
                    name=f"mask_{gi}", aggregation=agg,
                )
            )
            self._scales.append(
                self.add_weight(
                    shape=(), initializer="ones", trainable=False, name=f"scale_{gi}", aggregation=agg
                )
            )
            for si, slot in enumerate(slots):
                shape = tuple(slot.read().shape)
                slot.z = self.add_weight(
                    shape=shape, initializer="zeros", trainable=False, name=f"z_{gi}_{si}", aggregation=agg
                )
                slot.u = self.add_weight(
                    shape=shape, initializer="zeros", trainable=False, name=f"u_{gi}_{si}", aggregation=agg
                )
        self.built = True
        self.reset()

    # ------------------------------------------------------------------ config
    def get_config(self):
        """Keep counts, schedules and cadence; not the model (see `from_student_config`).

        Z, U, ρ and the step are state: they travel with the weights.
        """
        return {
            "keep": {gid: int(k) for gid, k in self.keep_counts().items()},
            "sparsity_schedule": keras.saving.serialize_keras_object(self.sparsity_schedule),
            "rho": keras.saving.serialize_keras_object(self.rho_schedule),
            "update_every": self.update_every,
            "normalize": self.normalize,
            "name": self.name,
        }

    @classmethod
    def from_student_config(cls, model, config):
        """Re-creates the ADMM term of `get_config` on `model` (e.g. a deserialized student)."""
        config = dict(config)
        for key in ("sparsity_schedule", "rho"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(model, **config)

    @classmethod
    def from_config(cls, config):
        raise ValueError(
            "ADMM regularises a model: re-create it with ADMM.from_student_config(model, config)"
        )

    # ------------------------------------------------------------------ state
    @property
    def group_ids(self):
        """Ids of the regularised groups (those with keep < size)."""
        return [group.id for group, _, _ in self._groups]

    def keep_counts(self):
        """Final kept channels per regularised group, `{group_id: k}`."""
        return {group.id: k for group, k, _ in self._groups}

    def slots(self, group_id):
        """`[(ParamRef, weight, Z, U)]` of one group, for inspection and tests."""
        for group, _, slots in self._groups:
            if group.id == group_id:
                return [(s.ref, s.variable, s.z, s.u) for s in slots]
        raise ValueError(f"group {group_id!r} is not regularised; regularised: {self.group_ids}")

    def mask(self, group_id):
        """Current keep mask (float 0/1, the support of Z) of one group."""
        for (group, _, _), mask in zip(self._groups, self._masks, strict=True):
            if group.id == group_id:
                return mask
        raise ValueError(f"group {group_id!r} is not regularised; regularised: {self.group_ids}")

    def regularised_weights(self):
        """N: the number of regularised weight entries (every slot of every group)."""
        return sum(int(np.prod(s.read().shape)) for _, _, slots in self._groups for s in slots)

    def reset(self, step=0):
        """U ← 0, ρ ← ρ(step), Z ← Π_k(W) at the sparsity of `step`; with `normalize`, ms_g of W now."""
        weights = float(self.regularised_weights()) if self.normalize == "mean" else 1.0
        for (_, _, slots), scale in zip(self._groups, self._scales, strict=True):
            for slot in slots:
                slot.u.assign(tf.zeros_like(slot.u))
            if self.normalize:
                values = [tf.cast(s.read(), tf.float32) for s in slots]
                total = tf.add_n([tf.reduce_sum(tf.square(v)) for v in values])
                count = float(sum(int(np.prod(v.shape)) for v in values))
                mean_square = total / count
                inverse = tf.where(mean_square > 0, 1.0 / tf.maximum(mean_square, 1e-30), 1.0)
                scale.assign(inverse / weights)
        self.step.assign(tf.constant(step, tf.int64))
        self.rho.assign(tf.cast(self.rho_schedule(tf.constant(step, tf.int64)), tf.float32))
        self.sparsity.assign(0.0)
        self._update(tf.constant(step, tf.int64))

    # --------------------------------------------------------------- training
    def __call__(self, *args, **kwargs):
        # Keras' Layer.__call__ needs an input tensor; the penalty has none.
        del args, kwargs
        return self.penalty()

    def penalty(self):
        """ρ/2 · Σ_g s_g·‖W_g − Z_g + U_g‖² over the regularised slices (float32 scalar).

        s_g = 1, 1/ms_g with `normalize=True`, or 1/(ms_g·N) with `normalize="mean"`.
        """
        total = tf.constant(0.0, tf.float32)
        for (_, _, slots), scale in zip(self._groups, self._scales, strict=True):
            group_total = tf.constant(0.0, tf.float32)
            for slot in slots:
                diff = tf.cast(slot.read(), tf.float32) - slot.z.value + slot.u.value
                group_total = group_total + tf.reduce_sum(tf.square(diff))
            total = total + scale.value * group_total
        return 0.5 * self.rho.value * total

    def relative_distance(self):
        """‖W − Z‖² / ‖W‖² over every regularised slice (float32 scalar; 0 on the sparse set)."""
        dist = tf.constant(0.0, tf.float32)
        norm = tf.constant(0.0, tf.float32)
        for _, _, slots in self._groups:
            for slot in slots:
                value = tf.cast(slot.read(), tf.float32)
                dist = dist + tf.reduce_sum(tf.square(value - slot.z.value))
                norm = norm + tf.reduce_sum(tf.square(value))
        return dist / tf.maximum(norm, 1e-12)

    def support_multipliers(self):
        """`[(variable, multiplier)]`: 0/1 tensors (broadcastable to the variable) of Z's support.

        `variable * multiplier` is the hard prune of the current masks (the
        channels outside Z's support at zero), on every regularised weight.
        """
        out = {}
        for (_, _, slots), mask in zip(self._groups, self._masks, strict=True):
            for slot in slots:
                per_entry = tf.repeat(mask.value, slot.repeat)
                if slot.full:
                    vector = per_entry
                else:
                    n = int(slot.variable.shape[slot.axis])
                    vector = tf.tensor_scatter_nd_update(
                        tf.ones([n], tf.float32), tf.reshape(tf.cast(slot.indices, tf.int64), (-1, 1)), per_entry
                    )
                shape = [1] * len(slot.variable.shape)
                shape[slot.axis] = -1
                multiplier = tf.reshape(vector, shape)
                key = id(slot.variable)
                if key in out:
                    multiplier = out[key][1] * multiplier
                out[key] = (slot.variable, multiplier)
        return list(out.values())

    def on_train_step_end(self, iterations):
        """Records the step; every `update_every` steps updates ρ, Z and U (graph-safe).

        Args:
            iterations: `optimizer.iterations` after the update (int tensor).

        Returns:
            A bool tensor, whether Z/U were updated.
        """
        # Under a strategy the hook runs per replica: the mirrored Z/U/ρ are updated once.
        return runtime.call_once_cross_replica(self._step_end, iterations)

    def _step_end(self, iterations):
        step = tf.cast(iterations, tf.int64)
        self.step.assign(step)
        due = tf.equal(tf.math.floormod(step, self.update_every), 0)

        def update():
            self._update(step)
            return tf.constant(True)

        return tf.cond(due, update, lambda: tf.constant(False))

    def _advance_sparsity(self, step):
        """Takes the schedule's sparsity at `step` if its `should_prune` says so."""
        should_prune, sparsity = self.sparsity_schedule(tf.cast(step, tf.int64))
        self.sparsity.assign(
            tf.where(should_prune, tf.cast(sparsity, tf.float32), self.sparsity.value)
        )

    def current_keep(self, step=None):
        """Kept channels of each regularised group (int32 tensors).

        Args:
            step: `None` for the sparsity in force (set at the schedule's last
                `should_prune` step), or a step to read the schedule at.
        """
        if step is None:
            sparsity = self.sparsity.value
        else:
            _, sparsity = self.sparsity_schedule(tf.cast(step, tf.int64))
        if self.target_sparsity > 0:
            progress = tf.clip_by_value(tf.cast(sparsity, tf.float32) / self.target_sparsity, 0.0, 1.0)
        else:
            progress = tf.constant(0.0)
        keeps = []
        for group, k, _ in self._groups:
            removed = tf.cast(tf.round(progress * float(group.size - k)), tf.int32)
            keeps.append(group.size - removed)
        return keeps

    def _update(self, step, final=False):
        rho_new = tf.cast(self.rho_schedule(step), tf.float32)
        scale = self.rho.value / rho_new
        self.rho.assign(rho_new)
        if final:
            keeps = [tf.constant(k, tf.int32) for _, k, _ in self._groups]
        else:
            self._advance_sparsity(step)
            keeps = self.current_keep()
        for (_, _, slots), mask_var, k in zip(self._groups, self._masks, keeps, strict=True):
            values = [tf.cast(s.read(), tf.float32) + s.u.value * scale for s in slots]
            projected, mask = project_channels(
                values, [s.axis for s in slots], [s.repeat for s in slots], k
            )
            for slot, value, z in zip(slots, values, projected, strict=True):
                slot.z.assign(z)
                slot.u.assign(value - z)
            mask_var.assign(mask)

    # ---------------------------------------------------------------- results
    def sparsity_plan(self):
        """The hard-pruning plan: each group's channels in the support of Z.

        If Z is not yet at the final keep counts (the schedule has not reached
        `target_sparsity`), a last Z/U update at the final counts is made
        first, so the plan always has exactly `keep[g]` channels per group.

        Returns:
            A `tfkdp.PruningPlan`.
        """
        counts = [int(round(float(np.sum(m.numpy())))) for m in self._masks]
        if any(c != k for c, (_, k, _) in zip(counts, self._groups, strict=True)):
            logging.info("ADMM: Z not at the final sparsity yet; projecting W + U at the final keep counts")
            self._update(tf.constant(int(self.step.numpy()), tf.int64), final=True)
        keep = {}
        for (group, _, _), mask in zip(self._groups, self._masks, strict=True):
            keep[group.id] = [int(i) for i in np.flatnonzero(mask.numpy() > 0.5)]
        return PruningPlan(keep)


def _keep_counts(keep):
    if hasattr(keep, "items") and not isinstance(keep, dict):
        keep = dict(keep.items())
    if not isinstance(keep, dict):
        raise ValueError(
            f"keep must be a dict {{group_id: kept channels}} or a PruningPlan; received {type(keep).__name__}"
        )
    counts = {}
    for gid, value in keep.items():
        if isinstance(value, (list, tuple, np.ndarray)):
            value = len(value)
        counts[gid] = value
    return counts

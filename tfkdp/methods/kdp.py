"""KDP: knowledge distillation with ADMM structured pruning, and its two baselines.

`compress(teacher, student, train_data, val_data, target_macs_reduction)` runs

1. **budget**: `tfkdp.pruner.make_plan` turns the MAC (or parameter) target
   into a number of channels to keep per group (global, MAC-aware allocation by
   default);
2. **ADMM phase** (`admm_epochs`): the student is distilled from the teacher
   while the ADMM penalty ρ/2·‖W − Z + U‖² pulls it towards the channel-sparse
   set; the sparsity ramps up (polynomial schedule) and ρ grows;
3. **hard prune** from Z's support → `apply_plan` (masks that stay in force);
4. **masked KD fine-tune** (`finetune_epochs`);
5. **strip**: `strip_channels` returns the smaller model.

Baselines through the same entry, trained for the same total number of epochs
(`admm_epochs + finetune_epochs`):

- `method="prune_only"`: no teacher signal: the criterion picks the channels,
  then plain supervised fine-tuning (`tfkdp.training.train_classifier`) of the
  masked model, then strip;
- `method="kd_only"`: no pruning: the (dense, presumably smaller) student is
  distilled from the teacher; the returned plan is empty.

A non-finite loss stops training with `NonFiniteLossError`, after restoring
the weights of the last finite epoch end (or of the start of the phase).

Reference:
    Liu et al., "Deep Distillation-with-Structured-Sparsity Learning" (DDSL;
    its KDP algorithm), IEEE TPAMI 2023.
"""

import math

import keras
import numpy as np
from absl import logging

from tfkdp import admm as admm_lib
from tfkdp import criteria as criteria_lib
from tfkdp import pruner, schedules, training

__all__ = ["compress", "METHODS", "NonFiniteLossError", "NonFiniteGuard", "copy_model"]

METHODS = ("kdp", "prune_only", "kd_only")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good weights were restored."""


class NonFiniteGuard(keras.callbacks.Callback):
    """Stops on a non-finite loss, restores the last good weights, and raises.

    `keras.callbacks.TerminateOnNaN` only stops; the weights it leaves are the
    broken ones. This callback snapshots `variables` at the start of training
    and at every epoch end whose loss is finite, and on a non-finite batch loss
    writes the snapshot back and raises `NonFiniteLossError`.

    Args:
        variables: the variables to protect (e.g. `student.weights` plus ADMM state).
        phase: a name for the error message.
    """

    def __init__(self, variables, phase="training"):
        super().__init__()
        self._variables = list(variables)
        self._phase = phase
        self._snapshot = None
        self._snapshot_epoch = None

    def _take(self, epoch):
        self._snapshot = [np.array(keras.ops.convert_to_numpy(v)) for v in self._variables]
        self._snapshot_epoch = epoch

    def on_train_begin(self, logs=None):
        self._take("start")

    def on_epoch_end(self, epoch, logs=None):
        if _finite((logs or {}).get("loss")):
            self._take(epoch + 1)

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or _finite(loss):
            return
        for variable, value in zip(self._variables, self._snapshot, strict=True):
            variable.assign(value)
        if self.model is not None:
            self.model.stop_training = True
        where = "the start" if self._snapshot_epoch == "start" else f"epoch {self._snapshot_epoch}"
        raise NonFiniteLossError(
            f"{self._phase}: the loss became {float(keras.ops.convert_to_numpy(loss))} at batch "
            f"{batch}; weights restored to {where}. Lower the learning rate or rho, or check "
            "the data for NaN/inf"
        )


def recalibrate_batchnorm(model, data, num_batches=100):
    """Re-estimates every batch norm's moving statistics on `data`; no weight changes.

    The moving averages (momentum 0.99) lag behind weights that moved fast:
    short training at a high learning rate, ADMM shrinking channels, or a hard
    prune. This replaces them with the exact average of the batch statistics
    over `num_batches` batches (as in adaptive-BN evaluation of pruned nets).

    Args:
        model: a model containing `BatchNormalization` layers (nested included).
        data: a `tf.data.Dataset` of `(x, ...)` batches or of `x`.
        num_batches: how many batches to average (>= 1).

    Returns:
        The number of batch-norm layers recalibrated.

    Reference:
        Li et al., "EagleEye: Fast Sub-net Evaluation for Efficient Neural
        Network Pruning", ECCV 2020 (adaptive batch-norm).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an integer >= 1; received num_batches={num_batches!r}")
    layers = [
        layer for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]  # fmt: skip
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    try:
        for i, batch in enumerate(data.take(num_batches)):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for layer in layers:
                # moving ← moving·(i/(i+1)) + batch/(i+1): the running mean of batch statistics.
                layer.momentum = i / (i + 1.0)
            model(x, training=True)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    return len(layers)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _finite(value):
    if value is None:
        return True
    return bool(np.all(np.isfinite(keras.ops.convert_to_numpy(value))))


def copy_model(model, name=None):
    """A trainable copy of a functional model with the same weights (self-compression)."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    # A frozen source (a Distiller freezes its teacher) clones frozen, layer by layer;
    # `Model.trainable = True` does not reach the layers of a functional model.
    _unfreeze(clone)
    if name:
        clone.name = name
    return clone


def _unfreeze(model):
    model.trainable = True
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _unfreeze(layer)
        layer.trainable = True


def _check_epochs(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; received {name}={value!r}")


def _default_rho(steps, update_every, rho_initial, rho_final):
    """ρ growing geometrically from `rho_initial` to `rho_final` over the first 3/4 of the steps."""
    periods = max(1, int(0.75 * steps) // update_every)
    multiplier = (rho_final / rho_initial) ** (1.0 / periods) if rho_final > rho_initial else 1.0
    return schedules.ExponentialRho(rho_initial, max(1.0, multiplier), update_every, rho_final)


def _distill(teacher, student, train_data, val_data, epochs, learning_rate, phase, *,
             sparsity=None, distillation_losses=None, student_loss_weight=0.5, weight_decay=5e-4,
             optimizer="sgd", jit_compile="auto", steps_per_execution=1, callbacks=(), verbose=0):
    """One KD phase: a fresh Distiller and LR schedule, guarded against non-finite losses.

    Returns the phase's `History.history`.
    """
    from tfkdp.distiller import Distiller

    distiller = Distiller(
        teacher, student, distillation_losses=distillation_losses,
        student_loss_weight=student_loss_weight, sparsity=sparsity,
    )  # fmt: skip
    distiller.compile(
        optimizer=training.make_optimizer(
            training.steps_in(train_data) * epochs, learning_rate, weight_decay, optimizer
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    protected = list(student.weights) + (list(sparsity.weights) if sparsity is not None else [])
    guard = NonFiniteGuard(protected, phase=phase)
    history = distiller.fit(
        train_data, validation_data=val_data, epochs=epochs,
        callbacks=[guard, *callbacks], verbose=verbose,
    )  # fmt: skip
    return history.history


def compress(
    teacher,
    student=None,
    train_data=None,
    val_data=None,
    target_macs_reduction=None,
    *,
    method="kdp",
    target_params_reduction=None,
    admm_epochs=1,
    finetune_epochs=1,
    criterion="l1",
    allocation="global",
    min_channels=1,
    round_to=1,
    rho=None,
    rho_initial=0.1,
    rho_final=5.0,
    update_every=4,
    sparsity_ramp=0.25,
    learning_rate=0.05,
    finetune_learning_rate=None,
    weight_decay=5e-4,
    optimizer="sgd",
    distillation_losses=None,
    student_loss_weight=0.5,
    jit_compile="auto",
    steps_per_execution=1,
    recalibrate_bn=100,
    callbacks=(),
    verbose=0,
):
    """Compresses `student` to a MAC (or parameter) budget with KDP or a baseline.

    Args:
        teacher: the trained teacher `keras.Model` (or a path, see
            `tfkdp.Distiller`). Not used by `prune_only` except as the default student.
        student: the model to compress; `None` means a copy of the teacher
            (self-compression). It may be another architecture. It is trained
            in place; the compressed model is a new one.
        train_data: a finite, batched `tf.data.Dataset` of `(x, y)` (integer labels).
        val_data: optional validation dataset, evaluated after each epoch.
        target_macs_reduction: fraction of the student's MACs to remove, in (0, 1).
        method: `"kdp"`, `"prune_only"` or `"kd_only"` (see the module docstring).
        target_params_reduction: alternatively, fraction of parameters to remove.
        admm_epochs: epochs of the ADMM + KD phase (`kdp`, >= 1).
        finetune_epochs: epochs of fine-tuning after the hard prune (>= 0).
            Baselines train `admm_epochs + finetune_epochs` epochs.
        criterion: importance criterion (`tfkdp.criteria.names()`) used by
            the budget allocation and, for `prune_only`, to pick channels.
        allocation: `"global"` or `"uniform"` (see `tfkdp.pruner.make_plan`).
        min_channels: fewest channels a pruned group keeps.
        round_to: kept channel counts are multiples of this.
        rho: ADMM ρ: a number, or a callable `step -> rho`; `None` ramps it
            geometrically from `rho_initial` to `rho_final` over the first 3/4
            of the ADMM phase.
        rho_initial: see `rho`.
        rho_final: see `rho`.
        update_every: optimizer steps between ADMM Z/U updates.
        sparsity_ramp: fraction of the ADMM phase over which the sparsity
            rises (polynomial, Zhu & Gupta) from 0 to the target; the rest runs
            at the target.
        learning_rate: peak learning rate (warm-up + cosine per phase).
        finetune_learning_rate: peak learning rate of the fine-tune phase
            (defaults to `learning_rate`).
        weight_decay: decoupled weight decay.
        optimizer: `"sgd"` or `"adamw"`.
        distillation_losses: as `tfkdp.Distiller` (`None`: `SoftTargetKD(4.0)`).
        student_loss_weight: weight of the task loss in the Distiller.
        jit_compile: `"auto"` (XLA on GPU only), `True` or `False`.
        steps_per_execution: passed to `compile`.
        recalibrate_bn: batches of `train_data` over which batch-norm moving
            statistics are re-estimated at the end (see
            `recalibrate_batchnorm`); 0 keeps the moving averages of training.
        callbacks: extra Keras callbacks for every phase.
        verbose: Keras `fit` verbosity.

    Returns:
        `(compressed_model, plan, history)`: the stripped model (for
        `kd_only`, the trained student itself); the `PruningPlan` applied to
        the student (empty for `kd_only`); and a dict `{phase: History.history}`
        with phases `"admm"` and `"finetune"` (`kdp`), `"finetune"`
        (`prune_only`) or `"kd"` (`kd_only`).

    Raises:
        ValueError: for an unknown method, a missing teacher or data, a bad
            target or epoch count (the message names the received value), or
            an unreachable target.
        NonFiniteLossError: when the loss becomes NaN/inf (weights restored).

    Example:
        >>> small, plan, history = compress(teacher, None, train_ds, val_ds,
        ...                                 target_macs_reduction=0.5,
        ...                                 admm_epochs=10, finetune_epochs=10)
        >>> small.save("student.keras")

    Reference:
        Liu et al., DDSL/KDP, IEEE TPAMI 2023.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; received method={method!r}")
    if train_data is None:
        raise ValueError("train_data is required (a finite, batched tf.data.Dataset of (x, y))")
    _check_epochs("admm_epochs", admm_epochs, 1 if method == "kdp" else 0)
    _check_epochs("finetune_epochs", finetune_epochs, 0)
    total_epochs = admm_epochs + finetune_epochs
    if total_epochs < 1:
        raise ValueError(
            f"admm_epochs + finetune_epochs must be >= 1; received {admm_epochs} + {finetune_epochs}"
        )
    _check_epochs("update_every", update_every, 1)
    _check_epochs("recalibrate_bn", recalibrate_bn, 0)
    if isinstance(sparsity_ramp, bool) or not isinstance(sparsity_ramp, (int, float)) or not (
        0.0 < sparsity_ramp <= 1.0
    ):
        raise ValueError(f"sparsity_ramp must be in (0, 1]; received sparsity_ramp={sparsity_ramp!r}")
    for name, value in (("rho_initial", rho_initial), ("rho_final", rho_final)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0; received {name}={value!r}")
    if rho is not None:
        rho = schedules.get_rho_schedule(rho)
    finetune_learning_rate = learning_rate if finetune_learning_rate is None else finetune_learning_rate

    if method != "prune_only" and teacher is None:
        raise ValueError(f"method={method!r} needs a teacher; received teacher=None")
    if student is None:
        if teacher is None or not isinstance(teacher, keras.Model):
            raise ValueError(
                "student=None means a copy of the teacher, which must then be a keras.Model; "
                f"received teacher={teacher!r}"
            )
        student = copy_model(teacher, name=f"{teacher.name}_student")
    if not isinstance(student, keras.Model):
        raise ValueError(f"student must be a keras.Model; received {type(student).__name__}")

    steps_per_epoch = training.steps_in(train_data)
    kd_args = dict(
        distillation_losses=distillation_losses, student_loss_weight=student_loss_weight,
        weight_decay=weight_decay, optimizer=optimizer, jit_compile=jit_compile,
        steps_per_execution=steps_per_execution, callbacks=callbacks, verbose=verbose,
    )  # fmt: skip
    from tfkdp.graph import channel_groups
    from tfkdp.plan import PruningPlan

    if method == "kd_only":
        if target_macs_reduction is not None or target_params_reduction is not None:
            logging.info("compress(method='kd_only'): the reduction target is ignored (no pruning)")
        history = _distill(
            teacher, student, train_data, val_data, total_epochs, learning_rate, "kd_only", **kd_args
        )
        if recalibrate_bn:
            recalibrate_batchnorm(student, train_data, recalibrate_bn)
        return student, PruningPlan({}), {"kd": history}

    crit = criteria_lib.get(criterion)
    groups = channel_groups(student)
    plan = pruner.make_plan(
        student,
        groups=groups,
        target_macs_reduction=target_macs_reduction,
        target_params_reduction=target_params_reduction,
        criterion=crit,
        allocation=allocation,
        min_channels=min_channels,
        round_to=round_to,
        data=train_data if crit.requires_data else None,
    )
    from tfkdp.masking import apply_plan
    from tfkdp.surgery import strip_channels

    histories = {}
    if method == "prune_only":
        masked = apply_plan(student, plan)
        guard = NonFiniteGuard(masked.weights, phase="prune_only fine-tune")
        history = training.train_classifier(
            masked, train_data, val_data, epochs=total_epochs, learning_rate=learning_rate,
            weight_decay=weight_decay, optimizer=optimizer, jit_compile=jit_compile,
            callbacks=[guard, *callbacks], verbose=verbose, steps_per_execution=steps_per_execution,
        )  # fmt: skip
        histories["finetune"] = history.history
        if recalibrate_bn:
            recalibrate_batchnorm(masked, train_data, recalibrate_bn)
        return strip_channels(masked, plan), plan, histories

    # --- kdp: ADMM + KD phase.
    admm_steps = steps_per_epoch * admm_epochs
    keep = {gid: len(indices) for gid, indices in plan.items()}
    sizes = {g.id: g.size for g in groups}
    target_sparsity = sum(sizes[g] - k for g, k in keep.items()) / max(1, sum(sizes[g] for g in keep))
    sparsity_schedule = schedules.PolynomialDecay(
        0.0, target_sparsity, begin_step=0,
        end_step=max(1, int(math.ceil(sparsity_ramp * admm_steps))), frequency=update_every,
    )  # fmt: skip
    if rho is None:
        rho = _default_rho(admm_steps, update_every, rho_initial, rho_final)
    admm = admm_lib.ADMM(
        student, keep, sparsity_schedule=sparsity_schedule, rho=rho,
        update_every=update_every, groups=groups,
    )  # fmt: skip
    histories["admm"] = _distill(
        teacher, student, train_data, val_data, admm_epochs, learning_rate, "kdp ADMM phase",
        sparsity=admm, **kd_args,
    )  # fmt: skip
    plan = admm.sparsity_plan()

    # --- hard prune, masked KD fine-tune, strip.
    masked = apply_plan(student, plan)
    if finetune_epochs:
        histories["finetune"] = _distill(
            teacher, masked, train_data, val_data, finetune_epochs, finetune_learning_rate,
            "kdp fine-tune", **kd_args,
        )  # fmt: skip
    if recalibrate_bn:
        recalibrate_batchnorm(masked, train_data, recalibrate_bn)
    return strip_channels(masked, plan), plan, histories

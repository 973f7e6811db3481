"""Reusable training phases: a recipe is a short sequence of these.

- `Training`: the knobs every phase shares (learning rate, optimizer, weight
  decay, KD losses, XLA choice, callbacks, verbosity), one value object
  instead of loose keyword arguments.
- `distill(...)`: a knowledge-distillation phase (fresh `Distiller`, optional
  sparsity term such as ADMM, warm-up + cosine schedule, non-finite guard).
- `finetune(...)`: a supervised phase with the house recipe, guarded.
- `hard_prune(model, plan)`: masks the plan's channels (same graph).
- `recalibrate(model, data, batches)`: batch-norm re-estimation.

Every phase returns its `History.history` dict (or the new model for
`hard_prune`) and raises `NonFiniteLossError` with the last good weights
restored when the loss becomes NaN/inf.
"""

import dataclasses
import json
import os
import re
import shutil

import keras

from tfkdp import checks
from tfkdp.train import recipe
from tfkdp.train.batchnorm import recalibrate_batchnorm
from tfkdp.train.guard import NonFiniteGuard

__all__ = ["Training", "distill", "finetune", "hard_prune", "recalibrate"]

_OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class Training:
    """What every training phase of a recipe shares.

    Attributes:
        learning_rate: peak learning rate of each phase (warm-up + cosine).
        finetune_learning_rate: peak learning rate of fine-tune phases
            (`None`: `learning_rate`).
        weight_decay: decoupled weight decay.
        optimizer: `"sgd"` (Nesterov) or `"adamw"`.
        distillation_losses: KD losses of KD phases (`None`: `SoftTargetKD(4.0)`).
        student_loss_weight: weight of the task loss in KD phases.
        jit_compile: `"auto"` (XLA on GPU only), `True` or `False`.
        steps_per_execution: optimizer steps per compiled call.
        recalibrate_bn: batches over which batch-norm statistics are
            re-estimated after the last phase (0: keep the moving averages).
        callbacks: extra Keras callbacks for every phase.
        verbose: Keras `fit` verbosity.
        backup_dir: `None`, or a folder where each phase checkpoints its
            training state every epoch (`keras.callbacks.BackupAndRestore`,
            in `<backup_dir>/<phase>`): a killed run (e.g. a lost worker
            under `MultiWorkerMirroredStrategy`) resumes at the last finished
            epoch; the checkpoint is removed when the phase ends. Phases
            given their own `BackupAndRestore` keep theirs.
    """

    learning_rate: float = 0.05
    finetune_learning_rate: float = None
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    distillation_losses: tuple = None
    student_loss_weight: float = 0.5
    jit_compile: object = "auto"
    steps_per_execution: int = 1
    recalibrate_bn: int = 100
    callbacks: tuple = ()
    verbose: int = 0
    backup_dir: str = None

    def __post_init__(self):
        checks.check_number("learning_rate", self.learning_rate, 0, strict=True)
        if self.finetune_learning_rate is not None:
            checks.check_number("finetune_learning_rate", self.finetune_learning_rate, 0, strict=True)
        checks.check_number("weight_decay", self.weight_decay, 0)
        checks.check_choice("optimizer", self.optimizer, _OPTIMIZERS)
        checks.check_number("student_loss_weight", self.student_loss_weight, 0)
        checks.check_int("steps_per_execution", self.steps_per_execution, 1)
        checks.check_int("recalibrate_bn", self.recalibrate_bn, 0)

    @classmethod
    def of(cls, value):
        """A `Training` from `None` (the defaults), a `Training` or a dict of its fields.

        Raises:
            ValueError: for anything else.
        """
        if value is None:
            return cls()
        if isinstance(value, dict):
            return cls(**value)
        if not isinstance(value, cls):
            raise ValueError(f"training must be a Training or a dict; received {value!r}")
        return value

    @property
    def finetune_lr(self):
        """The peak learning rate of fine-tune phases."""
        if self.finetune_learning_rate is None:
            return self.learning_rate
        return self.finetune_learning_rate

    def to_dict(self):
        """The JSON-serialisable settings (callbacks and loss objects by name)."""
        losses = self.distillation_losses
        return {
            "learning_rate": self.learning_rate,
            "finetune_learning_rate": self.finetune_lr,
            "weight_decay": self.weight_decay,
            "optimizer": self.optimizer,
            "distillation_losses": (
                None if losses is None else [type(loss).__name__ for loss in losses]
            ),
            "student_loss_weight": self.student_loss_weight,
            "steps_per_execution": self.steps_per_execution,
            "recalibrate_bn": self.recalibrate_bn,
        }


def distill(teacher, student, train_data, val_data, epochs, training, phase, *,
            sparsity=None, learning_rate=None, distiller_factory=None, callbacks=()):  # fmt: skip
    """One knowledge-distillation phase; trains `student` in place.

    Args:
        teacher: the teacher model (or path, see `tfkdp.Distiller`).
        student: the student `keras.Model`.
        train_data: a finite, batched `tf.data.Dataset` of `(x, y)`.
        val_data: optional validation dataset.
        epochs: epochs of this phase (>= 1).
        training: a `Training`.
        phase: the phase's name (for errors and logs).
        sparsity: an optional sparsity term (e.g. `tfkdp.ADMM`).
        learning_rate: this phase's peak learning rate (default
            `training.learning_rate`).
        distiller_factory: `None` (a `tfkdp.Distiller`) or a callable taking
            the `Distiller`'s arguments and returning a `Distiller` (e.g.
            DDSL's `DeanDistiller` with its dean bound).
        callbacks: extra callbacks of this phase only (run before
            `training.callbacks`).

    Returns:
        The phase's `History.history`.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (weights restored).

    Reference:
        Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
    """
    from tfkdp.distill.distiller import Distiller

    checks.check_int("epochs", epochs, 1)
    lr = training.learning_rate if learning_rate is None else learning_rate
    distiller = (distiller_factory or Distiller)(
        teacher, student, distillation_losses=training.distillation_losses,
        student_loss_weight=training.student_loss_weight, sparsity=sparsity,
    )  # fmt: skip
    distiller.compile(
        optimizer=recipe.make_optimizer(
            recipe.steps_in(train_data) * epochs, lr, training.weight_decay, training.optimizer
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=training.jit_compile,
        steps_per_execution=training.steps_per_execution,
    )
    protected = list(student.weights) + (list(sparsity.weights) if sparsity is not None else [])
    controller = getattr(distiller, "dean", None)  # a meta-learned controller's state, if any
    protected += list(controller.weights) if controller is not None else []
    guard = NonFiniteGuard(protected, phase=phase)
    history = distiller.fit(
        train_data, validation_data=val_data, epochs=epochs,
        callbacks=_with_backup([guard, *callbacks, *training.callbacks], training, phase),
        verbose=training.verbose,
    )  # fmt: skip
    return history.history


def finetune(model, train_data, val_data, epochs, training, phase, *, learning_rate=None):
    """One supervised phase with the house recipe (`tfkdp.train.recipe`); in place.

    Args:
        model: a logits classifier (masked or not).
        train_data: a finite, batched `tf.data.Dataset` of `(x, y)`.
        val_data: optional validation dataset.
        epochs: epochs of this phase (>= 1).
        training: a `Training`.
        phase: the phase's name.
        learning_rate: this phase's peak learning rate (default
            `training.learning_rate`).

    Returns:
        The phase's `History.history`.
    """
    checks.check_int("epochs", epochs, 1)
    guard = NonFiniteGuard(model.weights, phase=phase)
    history = recipe.train_classifier(
        model, train_data, val_data, epochs=epochs,
        learning_rate=training.learning_rate if learning_rate is None else learning_rate,
        weight_decay=training.weight_decay, optimizer=training.optimizer,
        jit_compile=training.jit_compile,
        callbacks=_with_backup([guard, *training.callbacks], training, phase),
        verbose=training.verbose, steps_per_execution=training.steps_per_execution,
    )  # fmt: skip
    return history.history


def _with_backup(callbacks, training, phase):
    """`callbacks` led by a `BackupAndRestore` in `training.backup_dir/<phase>` (if set and none given).

    First in the list, so the weights are restored before any other callback
    (the non-finite guard) records them.

    Reference:
        `keras.callbacks.BackupAndRestore`.
    """
    if training.backup_dir is None or any(
        isinstance(c, keras.callbacks.BackupAndRestore) for c in callbacks
    ):
        return callbacks
    folder = os.path.join(training.backup_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", phase))
    # Two states on disk, each written atomically: a worker killed while saving leaves a
    # readable one.
    return [AtomicBackupAndRestore(folder, double_checkpoint=True), *callbacks]


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose files are written to a temporary name, then renamed.

    Keras writes its weights file in place: a process killed during the write
    left a file h5py cannot open, and with no earlier state to fall back on
    `fit` then failed with `OSError` (seen with a worker killed at its first
    epoch end). Here a kill leaves the previous state, or the new weights with
    the previous epoch number (that epoch is then trained once more).

    Reference:
        `keras.callbacks.BackupAndRestore` (Keras 3).
    """

    def _save_model(self):
        from tfkdp.export._atomic import write_bytes_atomic

        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint:
            for current, previous in ((self._weights_path, self._prev_weights_path),
                                      (self._training_metadata_path, self._prev_training_metadata_path)):  # fmt: skip
                if os.path.exists(current):
                    tmp = previous + ".tmp"
                    shutil.copyfile(current, tmp)
                    os.replace(tmp, previous)
        tmp = self._weights_path[: -len(".weights.h5")] + ".partial.weights.h5"
        self.model.save_weights(filepath=tmp, overwrite=True)
        os.replace(tmp, self._weights_path)
        metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        write_bytes_atomic(self._training_metadata_path, json.dumps(metadata).encode("utf-8"))


def hard_prune(model, plan):
    """The plan's channels masked to zero (`tfkdp.apply_plan`); a new model."""
    from tfkdp.pruning.masking import apply_plan

    return apply_plan(model, plan)


def recalibrate(model, train_data, training):
    """Batch-norm re-estimation over `training.recalibrate_bn` batches (0: none)."""
    if training.recalibrate_bn:
        return recalibrate_batchnorm(model, train_data, training.recalibrate_bn)
    return 0

"""Plain supervised training of a classifier: the teacher stage and the baselines' fine-tune.

One recipe, used by the pipeline's teacher stage, by `prune_only` fine-tuning
and by the benchmarks, so that every accuracy we compare was trained the same
way: SGD with Nesterov momentum (or AdamW), decoupled weight decay, a linear
warm-up then cosine decay of the learning rate, sparse categorical
cross-entropy on logits.
"""

import math

import keras
import tensorflow as tf

from tfkdp.train import runtime

__all__ = ["make_optimizer", "compile_classifier", "train_classifier", "steps_in"]

_OPTIMIZERS = ("sgd", "adamw")


def steps_in(dataset):
    """Batches per epoch of a finite `tf.data.Dataset` (counted if unknown).

    Raises:
        ValueError: for an infinite dataset.
    """
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        raise ValueError("train_data is infinite; pass a finite dataset (one epoch per pass)")
    if cardinality == tf.data.UNKNOWN_CARDINALITY:
        cardinality = sum(1 for _ in dataset)
    return cardinality


def make_optimizer(
    total_steps, learning_rate=0.05, weight_decay=5e-4, optimizer="sgd", warmup_fraction=0.05
):
    """An optimizer with linear warm-up then cosine decay to zero over `total_steps`.

    Args:
        total_steps: optimizer steps of the whole run (>= 1).
        learning_rate: peak learning rate.
        weight_decay: decoupled weight decay (0 disables it).
        optimizer: `"sgd"` (Nesterov momentum 0.9) or `"adamw"`.
        warmup_fraction: share of `total_steps` spent warming up, in [0, 1).

    Returns:
        A `keras.optimizers.Optimizer`.

    Raises:
        ValueError: for an unknown optimizer name or non-positive steps/rate.
    """
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}; received optimizer={optimizer!r}")
    if int(total_steps) < 1:
        raise ValueError(f"total_steps must be >= 1; received total_steps={total_steps!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0; received learning_rate={learning_rate!r}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must lie in [0, 1); received {warmup_fraction!r}")
    schedule = make_schedule(total_steps, learning_rate, warmup_fraction)
    decay = float(weight_decay) or None
    if optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=decay)
    return keras.optimizers.AdamW(schedule, weight_decay=float(weight_decay))


def make_schedule(total_steps, learning_rate=0.05, warmup_fraction=0.05):
    """`make_optimizer`'s learning-rate schedule: linear warm-up, then cosine decay to zero.

    Args:
        total_steps: optimizer steps of the whole run (>= 1).
        learning_rate: peak learning rate.
        warmup_fraction: share of `total_steps` spent warming up, in [0, 1).

    Returns:
        A `keras.optimizers.schedules.CosineDecay` (callable on step numbers).
    """
    warmup = int(math.floor(int(total_steps) * warmup_fraction))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else learning_rate,
        decay_steps=max(1, int(total_steps) - warmup),
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )


def compile_classifier(model, optimizer, jit_compile="auto", steps_per_execution=1):
    """Compiles `model` (which outputs logits) for integer-label classification."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=runtime.default_jit_compile(jit_compile),
        steps_per_execution=steps_per_execution,
    )
    return model


def train_classifier(
    model,
    train_data,
    val_data=None,
    epochs=1,
    learning_rate=0.05,
    weight_decay=5e-4,
    optimizer="sgd",
    jit_compile="auto",
    callbacks=(),
    verbose=1,
    steps_per_execution=1,
):
    """Trains a logits classifier with the house recipe and returns its `History`.

    Args:
        model: a `keras.Model` mapping images to logits; trained in place.
        train_data: a finite, batched `tf.data.Dataset` of `(x, y)` or `(x, y, w)`.
        val_data: optional validation dataset, evaluated after each epoch.
        epochs: number of passes over `train_data` (>= 1).
        learning_rate: peak learning rate of the warm-up + cosine schedule.
        weight_decay: decoupled weight decay.
        optimizer: `"sgd"` or `"adamw"`.
        jit_compile: `"auto"` (XLA on GPU only), `True` or `False`.
        callbacks: extra Keras callbacks.
        verbose: Keras progress-bar verbosity.
        steps_per_execution: optimizer steps per compiled call (passed to `compile`).

    Returns:
        The `keras.callbacks.History` of `model.fit`.

    Raises:
        ValueError: for `epochs` < 1, an infinite dataset, or bad optimizer settings.

    Example:
        >>> history = train_classifier(model, train_ds, val_ds, epochs=2, verbose=0)
        >>> len(history.history["val_accuracy"])
        2
    """
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1; received epochs={epochs!r}")
    total_steps = steps_in(train_data) * int(epochs)
    compile_classifier(
        model,
        make_optimizer(total_steps, learning_rate, weight_decay, optimizer),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    return model.fit(
        train_data,
        validation_data=val_data,
        epochs=int(epochs),
        shuffle=False,  # the tf.data pipeline shuffles; Keras would only warn
        callbacks=list(callbacks),
        verbose=verbose,
    )

"""Sparsity and ADMM penalty (ρ) schedules: pure functions of the optimizer step.

Sparsity schedules follow the protocol of tfmot's
`tensorflow_model_optimization.sparsity.keras.PruningSchedule`:
`schedule(step) -> (should_prune, sparsity)`, two scalar tensors (bool and
float32). Any object with that call signature works wherever tfkdp takes a
sparsity schedule, including tfmot's own `PolynomialDecay` and
`ConstantSparsity` (tfkdp never imports tfmot itself: importing it sets
`TF_USE_LEGACY_KERAS=1` in the process environment).

ρ schedules map a step to the ADMM penalty coefficient, `rho(step) -> float32`.

All schedules hold no state: the step comes from `optimizer.iterations`, which
checkpoints carry, so a resumed run continues the same curve.
"""

import keras
import tensorflow as tf

from tfkdp.checks import check_fraction, check_int, check_number

__all__ = [
    "SparsitySchedule",
    "ConstantSparsity",
    "PolynomialDecay",
    "RhoSchedule",
    "ConstantRho",
    "ExponentialRho",
    "get_sparsity_schedule",
    "get_rho_schedule",
]


def _sparsity(name, value):
    return check_fraction(name, value, low_inclusive=True)


def _positive(name, value):
    return check_number(name, value, 0, strict=True)


def _as_step(step):
    return tf.cast(step, tf.int64)


class SparsitySchedule:
    """Base class of sparsity schedules (tfmot's `PruningSchedule` protocol).

    Subclasses implement `__call__(step) -> (should_prune, sparsity)` and
    `get_config()`. `sparsity` is the fraction of channels removed, in [0, 1).
    """

    def __call__(self, step):
        raise NotImplementedError(
            f"{type(self).__name__} must implement __call__(step) -> (should_prune, sparsity)"
        )

    def get_config(self):
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @staticmethod
    def _should_prune(step, begin_step, end_step, frequency):
        # Same rule as tfmot: inside [begin, end] (end = -1: forever), every `frequency` steps.
        step = _as_step(step)
        in_range = tf.logical_and(
            step >= begin_step,
            tf.logical_or(step <= end_step, tf.constant(end_step < 0)),
        )
        on_turn = tf.equal(tf.math.floormod(step - begin_step, frequency), 0)
        return tf.logical_and(in_range, on_turn)


@keras.saving.register_keras_serializable(package="tfkdp")
class ConstantSparsity(SparsitySchedule):
    """The same sparsity at every step from `begin_step` on (as tfmot's).

    Args:
        target_sparsity: fraction of channels removed, in [0, 1).
        begin_step: first step at which `should_prune` is true (>= 0).
        end_step: last such step; -1 means forever.
        frequency: `should_prune` is true every `frequency` steps.

    Raises:
        ValueError: for a sparsity outside [0, 1) or inconsistent steps.

    Example:
        >>> float(ConstantSparsity(0.5, 0)(10)[1])
        0.5
    """

    def __init__(self, target_sparsity, begin_step=0, end_step=-1, frequency=100):
        _sparsity("target_sparsity", target_sparsity)
        check_int("begin_step", begin_step, 0)
        check_int("frequency", frequency, 1)
        if isinstance(end_step, bool) or not isinstance(end_step, int) or (
            end_step != -1 and end_step < begin_step
        ):
            raise ValueError(
                f"end_step must be -1 or an integer >= begin_step ({begin_step}); "
                f"received end_step={end_step!r}"
            )
        self.target_sparsity = float(target_sparsity)
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency

    def __call__(self, step):
        should = self._should_prune(step, self.begin_step, self.end_step, self.frequency)
        return should, tf.constant(self.target_sparsity, tf.float32)

    def get_config(self):
        return {
            "target_sparsity": self.target_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }


@keras.saving.register_keras_serializable(package="tfkdp")
class PolynomialDecay(SparsitySchedule):
    """Sparsity rising from `initial_sparsity` to `final_sparsity` (Zhu & Gupta).

    `s(t) = s_f + (s_i - s_f) · (1 - p)^power`, `p = clip((t - begin) / (end - begin), 0, 1)`:
    fast at first, then flattening, held at `final_sparsity` after `end_step`
    (the same curve as tfmot's `PolynomialDecay`).

    Args:
        initial_sparsity: sparsity at and before `begin_step`, in [0, 1).
        final_sparsity: sparsity at and after `end_step`, in [0, 1).
        begin_step: step where the ramp starts (>= 0).
        end_step: step where it ends (> `begin_step`).
        power: exponent of the decay (> 0).
        frequency: `should_prune` is true every `frequency` steps.

    Raises:
        ValueError: for sparsities outside [0, 1), `end_step <= begin_step`, `power <= 0`.

    Example:
        >>> schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=100)
        >>> round(float(schedule(100)[1]), 3)
        0.5

    Reference:
        Zhu & Gupta, "To prune, or not to prune", arXiv:1710.01878, 2017.
    """

    def __init__(
        self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100
    ):
        _sparsity("initial_sparsity", initial_sparsity)
        _sparsity("final_sparsity", final_sparsity)
        check_int("begin_step", begin_step, 0)
        check_int("frequency", frequency, 1)
        check_int("end_step", end_step, begin_step + 1)
        check_number("power", power, 0, strict=True)
        self.initial_sparsity = float(initial_sparsity)
        self.final_sparsity = float(final_sparsity)
        self.begin_step = begin_step
        self.end_step = end_step
        self.power = power
        self.frequency = frequency

    def __call__(self, step):
        progress = tf.cast(_as_step(step) - self.begin_step, tf.float32) / float(
            self.end_step - self.begin_step
        )
        progress = tf.clip_by_value(progress, 0.0, 1.0)
        sparsity = self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * tf.pow(
            1.0 - progress, float(self.power)
        )
        should = self._should_prune(step, self.begin_step, self.end_step, self.frequency)
        return should, sparsity

    def get_config(self):
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "frequency": self.frequency,
        }


class RhoSchedule:
    """Base class of ADMM penalty schedules: `rho(step) -> float32` scalar tensor."""

    def __call__(self, step):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step) -> rho")

    def get_config(self):
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package="tfkdp")
class ConstantRho(RhoSchedule):
    """A fixed ADMM penalty coefficient.

    Args:
        rho: the coefficient ρ of ρ/2·‖W − Z + U‖² (> 0).

    Raises:
        ValueError: if `rho` <= 0.
    """

    def __init__(self, rho=1e-3):
        _positive("rho", rho)
        self.rho = float(rho)

    def __call__(self, step):
        del step  # constant by definition
        return tf.constant(self.rho, tf.float32)

    def get_config(self):
        return {"rho": self.rho}


@keras.saving.register_keras_serializable(package="tfkdp")
class ExponentialRho(RhoSchedule):
    """ρ multiplied by `multiplier` every `every_steps` steps, capped at `max_rho`.

    `ρ(t) = min(max_rho, initial_rho · multiplier^floor(t / every_steps))`. A
    growing ρ lets W move freely at first, then pins it to the sparse Z
    (the "progressive" ADMM of Ye et al.).

    Args:
        initial_rho: ρ at step 0 (> 0).
        multiplier: growth factor per period (>= 1).
        every_steps: period length in optimizer steps (>= 1).
        max_rho: upper bound (>= `initial_rho`).

    Raises:
        ValueError: for non-positive values or `max_rho < initial_rho`.

    Example:
        >>> round(float(ExponentialRho(1e-3, 2.0, 10, 1e-2)(25)), 6)
        0.004

    Reference:
        Ye et al., "Progressive Weight Pruning of DNNs using ADMM", arXiv:1810.07378, 2018.
    """

    def __init__(self, initial_rho=1e-3, multiplier=1.5, every_steps=100, max_rho=1e-1):
        _positive("initial_rho", initial_rho)
        _positive("max_rho", max_rho)
        check_number("multiplier", multiplier, 1)
        check_int("every_steps", every_steps, 1)
        if max_rho < initial_rho:
            raise ValueError(
                f"max_rho must be >= initial_rho ({initial_rho}); received max_rho={max_rho!r}"
            )
        self.initial_rho = float(initial_rho)
        self.multiplier = float(multiplier)
        self.every_steps = every_steps
        self.max_rho = float(max_rho)

    def __call__(self, step):
        periods = tf.cast(tf.math.floordiv(_as_step(step), self.every_steps), tf.float32)
        rho = self.initial_rho * tf.pow(self.multiplier, periods)
        return tf.minimum(rho, self.max_rho)

    def get_config(self):
        return {
            "initial_rho": self.initial_rho,
            "multiplier": self.multiplier,
            "every_steps": self.every_steps,
            "max_rho": self.max_rho,
        }


def get_sparsity_schedule(schedule):
    """Returns `schedule` if it follows the protocol, else raises.

    Args:
        schedule: a `SparsitySchedule`, a tfmot `PruningSchedule`, or any
            callable `step -> (should_prune, sparsity)`.

    Raises:
        ValueError: if `schedule` is not callable.
    """
    if not callable(schedule):
        raise ValueError(
            "sparsity schedule must be callable as schedule(step) -> (should_prune, sparsity), "
            f"e.g. tfkdp.schedules.PolynomialDecay; received {schedule!r}"
        )
    return schedule


def get_rho_schedule(rho):
    """A `RhoSchedule` from a number (constant ρ) or a callable `step -> rho`.

    Raises:
        ValueError: for a non-positive number or a non-callable object.
    """
    if isinstance(rho, (int, float)) and not isinstance(rho, bool):
        return ConstantRho(rho)
    if not callable(rho):
        raise ValueError(
            f"rho must be a positive number or a callable step -> rho; received rho={rho!r}"
        )
    return rho

"""Sparsity and ρ schedules: values, protocol, configs, validation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkdp import schedules


def _reference_polynomial(step, initial, final, begin, end, power):
    p = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return final + (initial - final) * (1 - p) ** power


@pytest.mark.parametrize("step", [0, 5, 10, 37, 60, 110, 500])
def test_polynomial_decay_matches_closed_form(step):
    schedule = schedules.PolynomialDecay(0.1, 0.6, begin_step=10, end_step=110, power=3, frequency=5)
    should, sparsity = schedule(tf.constant(step, tf.int64))
    np.testing.assert_allclose(
        float(sparsity), _reference_polynomial(step, 0.1, 0.6, 10, 110, 3), rtol=1e-6
    )
    assert bool(should) == (10 <= step <= 110 and (step - 10) % 5 == 0)


def test_polynomial_decay_is_pure_function_of_step_inside_tf_function():
    schedule = schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=100)
    compiled = tf.function(lambda s: schedule(s)[1], jit_compile=True)
    eager = [float(schedule(s)[1]) for s in (0, 50, 100, 50)]
    traced = [float(compiled(tf.constant(s, tf.int64))) for s in (0, 50, 100, 50)]
    np.testing.assert_allclose(traced, eager, rtol=1e-6)
    assert eager[1] == eager[3]  # same step, same value: no hidden state


def test_constant_sparsity_range():
    schedule = schedules.ConstantSparsity(0.3, begin_step=4, end_step=8, frequency=2)
    flags = [bool(schedule(s)[0]) for s in range(11)]
    assert flags == [False] * 4 + [True, False, True, False, True, False, False]
    assert float(schedule(100)[1]) == pytest.approx(0.3)


def test_exponential_rho_ramps_and_caps():
    rho = schedules.ExponentialRho(initial_rho=1e-3, multiplier=2.0, every_steps=10, max_rho=1e-2)
    values = [float(rho(tf.constant(s, tf.int64))) for s in (0, 9, 10, 25, 39, 1000)]
    np.testing.assert_allclose(values, [1e-3, 1e-3, 2e-3, 4e-3, 8e-3, 1e-2], rtol=1e-6)


def test_constant_rho_and_get_rho_schedule_from_number():
    rho = schedules.get_rho_schedule(0.25)
    assert isinstance(rho, schedules.ConstantRho)
    assert float(rho(123)) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.ConstantSparsity(0.4, 3, 30, 7),
        schedules.PolynomialDecay(0.1, 0.7, 2, 90, power=2, frequency=3),
        schedules.ConstantRho(0.5),
        schedules.ExponentialRho(1e-4, 1.5, 20, 1e-1),
    ],
    ids=lambda s: type(s).__name__,
)
def test_schedule_config_round_trip(schedule):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    out = schedule(17)
    again = restored(17)
    np.testing.assert_allclose(
        np.asarray(out[-1] if isinstance(out, tuple) else out, dtype=np.float64),
        np.asarray(again[-1] if isinstance(again, tuple) else again, dtype=np.float64),
    )


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: schedules.PolynomialDecay(0.0, 1.0, 0, 10), "final_sparsity=1.0"),
        (lambda: schedules.PolynomialDecay(0.0, 0.5, 10, 10), "end_step=10"),
        (lambda: schedules.PolynomialDecay(0.0, 0.5, 0, 10, power=0), "power=0"),
        (lambda: schedules.ConstantSparsity(-0.1), "target_sparsity=-0.1"),
        (lambda: schedules.ConstantSparsity(0.5, begin_step=5, end_step=2), "end_step=2"),
        (lambda: schedules.ConstantSparsity(0.5, frequency=0), "frequency=0"),
        (lambda: schedules.ExponentialRho(1e-2, 2.0, 10, 1e-3), "max_rho=0.001"),
        (lambda: schedules.ExponentialRho(1e-2, 0.5, 10, 1e-1), "multiplier=0.5"),
        (lambda: schedules.ConstantRho(0), "rho=0"),
        (lambda: schedules.get_rho_schedule("big"), "rho='big'"),
        (lambda: schedules.get_sparsity_schedule(0.5), "0.5"),
    ],
)
def test_schedule_bad_arguments_name_the_value(build, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build()

"""tfkdp.runtime: per-device defaults."""

import pytest
import tensorflow as tf

from tfkdp import runtime


def test_default_jit_compile_is_xla_on_gpu_only_and_passes_explicit_values():
    assert runtime.default_jit_compile("auto") is runtime.has_gpu()
    assert runtime.default_jit_compile(True) is True
    assert runtime.default_jit_compile(False) is False
    with pytest.raises(ValueError, match="jit_compile='yes'"):
        runtime.default_jit_compile("yes")


def test_mirrored_strategy_on_cpu_devices_reduces_through_one_device():
    if runtime.has_gpu() or len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the 2 logical CPU devices of conftest.py and no GPU")
    strategy = runtime.mirrored_strategy()  # every logical CPU
    assert strategy.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))
    assert isinstance(strategy.extended._cross_device_ops, tf.distribute.ReductionToOneDevice)
    # A second strategy in the same process reduces correctly (no collective-key clash).
    second = runtime.mirrored_strategy(["/cpu:0", "/cpu:1"])
    total = second.reduce(
        tf.distribute.ReduceOp.SUM,
        second.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group + 1),
        axis=None,
    )
    assert int(total) == 3


def test_mirrored_strategy_rejects_an_empty_device_list():
    with pytest.raises(ValueError, match=r"devices=\[\]"):
        runtime.mirrored_strategy([])

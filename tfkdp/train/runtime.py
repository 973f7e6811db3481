"""Per-device runtime choices: XLA, strategies (one host, several hosts), mixed precision."""

import json
import os
import socket

import tensorflow as tf

__all__ = [
    "MIXED_PRECISION",
    "TF_CONFIG_EXAMPLE",
    "call_once_cross_replica",
    "default_jit_compile",
    "free_ports",
    "has_gpu",
    "is_chief",
    "mirrored_strategy",
    "multiworker_strategy",
    "parse_tf_config",
    "set_mixed_precision",
]


def has_gpu():
    """True when TensorFlow sees at least one GPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def default_jit_compile(jit_compile="auto"):
    """Resolves `jit_compile="auto"` per device: XLA on GPU, off on CPU.

    Keras' own `"auto"` turns XLA on for CPU too, which halved resnet20
    training throughput on a 2-core CPU (250 vs 500 img/s); on GPU XLA helps.
    Explicit `True`/`False` pass through unchanged.

    Args:
        jit_compile: `"auto"`, `True` or `False`.

    Returns:
        A bool.

    Raises:
        ValueError: for any other value.
    """
    if jit_compile == "auto":
        return has_gpu()
    if isinstance(jit_compile, bool):
        return jit_compile
    raise ValueError(
        f"jit_compile must be 'auto', True or False; received jit_compile={jit_compile!r}"
    )


def mirrored_strategy(devices=None):
    """A `tf.distribute.MirroredStrategy` over all GPUs, else over all CPU devices.

    On CPU devices the cross-device reduction goes through one device
    (`ReductionToOneDevice`): they share one host's memory, so collectives
    buy nothing there, and the collective instance keys of an earlier
    strategy in the same process can collide with a new one's ("Shape
    mismatch in the collective instance").

    Args:
        devices: device names; `None` means every logical GPU, or every
            logical CPU when there is no GPU.

    Returns:
        The strategy.

    Raises:
        ValueError: for an empty device list.
    """
    if devices is None:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
    devices = list(devices)
    if not devices:
        raise ValueError("mirrored_strategy needs at least one device; received devices=[]")
    types = {(tf.DeviceSpec.from_string(d).device_type or "").upper() for d in devices}
    if types == {"GPU"}:
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def call_once_cross_replica(fn, *args):
    """Calls `fn(*args)` once for all replicas, also from a per-replica train step.

    Under a `tf.distribute` strategy a train-step hook runs once per replica,
    and an assign to a mirrored variable inside `tf.cond` there needs a
    `merge_call`, which TensorFlow forbids in control flow. In a replica
    context this merges to the cross-replica context and calls `fn` there,
    once, on the first local replica's value of each argument; outside a
    strategy, or already cross-replica, it calls `fn(*args)`.

    Args:
        fn: what to run once (e.g. a step-end update of mirrored variables).
        *args: tensors with the same value on every replica (e.g.
            `optimizer.iterations`).

    Returns:
        What `fn` returns.

    Example:
        >>> int(call_once_cross_replica(lambda step: step + 1, tf.constant(1)))
        2
    """
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        return tf.distribute.get_replica_context().merge_call(
            lambda strategy, *values: fn(
                *(strategy.experimental_local_results(v)[0] for v in values)
            ),
            args=args,
        )
    return fn(*args)


# --------------------------------------------------------------- multi-worker
# What `multiworker_strategy` expects in TF_CONFIG (quoted in its errors).
TF_CONFIG_EXAMPLE = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
_TASK_TYPES = ("chief", "worker")


def _tf_config_error(problem, value):
    return ValueError(
        f"TF_CONFIG {problem}; received TF_CONFIG={value!r}. Expected a JSON object such as "
        f"{TF_CONFIG_EXAMPLE}: cluster.worker (and optionally cluster.chief, one address) lists "
        "host:port addresses, the same on every worker; task.type is 'worker' or 'chief' and "
        "task.index this process's position in that list"
    )


def parse_tf_config(value=None):
    """The validated cluster and task of `TF_CONFIG` (the environment variable when `value` is None).

    Args:
        value: the TF_CONFIG JSON text, or `None` to read `os.environ["TF_CONFIG"]`.

    Returns:
        A dict `{"cluster": {"chief"?: [address], "worker": [addresses]},
        "task": {"type": str, "index": int}}`.

    Raises:
        ValueError: when TF_CONFIG is missing, not JSON, or names no
            `cluster.worker` list of `host:port` addresses, a task type other
            than `worker`/`chief`, or a task index outside the list.

    Example:
        >>> parse_tf_config(TF_CONFIG_EXAMPLE)["task"]
        {'type': 'worker', 'index': 0}

    Reference:
        `tf.distribute.cluster_resolver.TFConfigClusterResolver` (the TF_CONFIG format).
    """
    if value is None:
        value = os.environ.get("TF_CONFIG")
    if value is None or not str(value).strip():
        raise _tf_config_error(
            "is not set (--strategy=multiworker needs it on every worker)", value
        )
    try:
        config = json.loads(value)
    except ValueError as error:
        raise _tf_config_error(f"is not valid JSON ({error})", value) from None
    if not isinstance(config, dict):
        raise _tf_config_error("is not a JSON object", value)
    cluster, task = config.get("cluster"), config.get("task")
    if (
        not isinstance(cluster, dict)
        or not isinstance(cluster.get("worker"), list)
        or not cluster["worker"]
    ):
        raise _tf_config_error("has no non-empty cluster.worker list", value)
    unknown = sorted(set(cluster) - set(_TASK_TYPES))
    if unknown:
        raise _tf_config_error(
            f"has cluster jobs {unknown}; allowed jobs are {list(_TASK_TYPES)}", value
        )
    if "chief" in cluster and (
        not isinstance(cluster["chief"], list) or len(cluster["chief"]) != 1
    ):
        raise _tf_config_error("has a cluster.chief that is not a list of one address", value)
    for job, addresses in cluster.items():
        for address in addresses:
            host, _, port = str(address).rpartition(":")
            if not isinstance(address, str) or not host or not port.isdigit():
                raise _tf_config_error(
                    f"has cluster.{job} address {address!r}, not host:port", value
                )
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise _tf_config_error(
            f"has task.type {None if not isinstance(task, dict) else task.get('type')!r}, not one "
            f"of its cluster's jobs {sorted(cluster)}", value,
        )  # fmt: skip
    index = task.get("index", 0)
    if (
        isinstance(index, bool)
        or not isinstance(index, int)
        or not 0 <= index < len(cluster[task["type"]])
    ):
        raise _tf_config_error(
            f"has task.index {index!r}, outside [0, {len(cluster[task['type']]) - 1}] of "
            f"cluster.{task['type']}", value,
        )  # fmt: skip
    return {"cluster": {job: list(a) for job, a in cluster.items()},
            "task": {"type": task["type"], "index": index}}  # fmt: skip


def is_chief(config=None):
    """True for the task that writes outputs: the `chief`, else `worker` 0 of a cluster without one.

    Args:
        config: a `parse_tf_config` result (`None`: parse the environment's TF_CONFIG).

    Raises:
        ValueError: for a missing or malformed TF_CONFIG (see `parse_tf_config`).

    Example:
        >>> is_chief(parse_tf_config(TF_CONFIG_EXAMPLE))
        True
    """
    config = parse_tf_config() if config is None else config
    task = config["task"]
    if "chief" in config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def multiworker_strategy():
    """A `tf.distribute.MultiWorkerMirroredStrategy` over the cluster of `TF_CONFIG`.

    Every worker runs the same program with its own TF_CONFIG (same
    `cluster`, its own `task`); each contributes all its local GPUs (or its
    CPU) as replicas, and gradients are all-reduced across workers every step.
    Create it before other TensorFlow work in the process: it configures the
    collective runtime.

    Returns:
        The strategy (`num_replicas_in_sync` = replicas of all workers).

    Raises:
        ValueError: when TF_CONFIG is missing or malformed (it names the
            expected format).

    Reference:
        `tf.distribute.MultiWorkerMirroredStrategy`,
        https://www.tensorflow.org/tutorials/distribute/multi_worker_with_keras
    """
    parse_tf_config()  # a clear error before TF's own resolver reads it
    return _MultiWorkerMirroredStrategy()


class _MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` also takes a nested structure.

    Keras 3's `fit`/`evaluate` (`_maybe_symbolic_build`) reduces the first
    data batch, an `(x, y)` tuple of `PerReplica` values, in one
    `strategy.reduce` call: `MirroredStrategy` lets it through, the
    multi-worker collectives try to convert the tuple to one tensor and fail
    (keras-team/keras#20585). Each value is reduced on its own here. Its
    train step then reduces each scalar log with `axis=0`, which a 0-d value
    does not have: a scalar is reduced over the replicas (`axis=None`), what
    `MirroredStrategy`'s path computes for it.
    """

    def reduce(self, reduce_op, value, axis):
        if isinstance(value, (tuple, list, dict)):
            parent = super()
            return tf.nest.map_structure(lambda v: parent.reduce(reduce_op, v, axis), value)
        local = self.experimental_local_results(value)[0]
        if axis is not None and getattr(local, "shape", None) is not None and local.shape.rank == 0:
            axis = None
        return super().reduce(reduce_op, value, axis)


def free_ports(n):
    """`n` distinct TCP ports that were free on 127.0.0.1, for a local cluster's `TF_CONFIG`.

    The ports are bound together (so they differ) and released before
    returning: another process may take one in between, which a local test or
    benchmark cluster can afford.

    Args:
        n: how many ports.

    Returns:
        A list of `n` port numbers.

    Example:
        >>> ports = free_ports(2)
        >>> len(set(ports))
        2
    """
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ----------------------------------------------------------- mixed precision
MIXED_PRECISION = ("none", "mixed_float16", "mixed_bfloat16")


def set_mixed_precision(policy):
    """Sets Keras' global dtype policy: `"none"` (float32), `"mixed_float16"` or `"mixed_bfloat16"`.

    Models built afterwards compute in float16/bfloat16 and keep float32
    variables; `compile` wraps the optimizer in a `LossScaleOptimizer` under
    `mixed_float16`. Worth it on GPUs with tensor cores (float16) or on
    TPUs/recent CPUs (bfloat16); on other CPUs it is slower than float32.

    Args:
        policy: one of `MIXED_PRECISION`.

    Returns:
        The previous global policy's name (to restore it).

    Raises:
        ValueError: for any other value.

    Reference:
        `keras.mixed_precision.set_global_policy`; Micikevicius et al.,
        "Mixed Precision Training", ICLR 2018.
    """
    import keras

    if policy not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}; received {policy!r}")
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32" if policy == "none" else policy)
    return previous

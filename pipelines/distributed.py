"""Strategy wiring of the compress pipeline: `--strategy`, data sharding, per-worker folders.

`--strategy=mirrored` trains on every device of one host; under
`--strategy=multiworker` every worker runs the training stages
(`TRAINING_STAGES`) in lockstep, the chief alone writes `output_dir` and runs
the other stages, and each other worker keeps its state in `worker_dir`.
"""

import contextlib
import hashlib
import os
import tempfile

import tensorflow as tf
from absl import logging

from tfkdp.pipelines.config import RESUME_DIR

__all__ = [
    "TRAINING_STAGES",
    "backup_dir",
    "barrier",
    "log_global_batch",
    "make_strategy",
    "scope",
    "sharded",
    "worker_dir",
]

# Stages every worker runs under --strategy=multiworker (they train, in lockstep);
# the chief alone runs the others.
TRAINING_STAGES = ("teacher", "compress", "finetune")


def make_strategy(name):
    """The `tf.distribute` strategy of `--strategy` (`default`, `mirrored` or `multiworker`)."""
    if name == "default":
        return tf.distribute.get_strategy()
    from tfkdp import runtime

    if name == "multiworker":
        strategy = runtime.multiworker_strategy()
        resolver = strategy.cluster_resolver
        logging.info("MultiWorkerMirroredStrategy: task %s:%d of %s, local devices %s",
                     resolver.task_type, resolver.task_id, resolver.cluster_spec().as_dict(),
                     list(strategy.extended.worker_devices))  # fmt: skip
        return strategy
    strategy = runtime.mirrored_strategy()
    logging.info("MirroredStrategy over %s", list(strategy.extended.worker_devices))
    return strategy


def log_global_batch(strategy, values):
    """Logs how `--batch_size` (the global batch) splits over the replicas.

    Raises:
        ValueError: under `--strategy=multiworker`, a global batch that is not
            a multiple of the replicas (the workers would get unequal shares).
    """
    replicas, batch = strategy.num_replicas_in_sync, values["batch_size"]
    if values["strategy"] == "multiworker" and batch % replicas:
        raise ValueError(
            f"--batch_size={batch} is the global batch; under --strategy=multiworker it must be a "
            f"multiple of the {replicas} replicas, e.g. {replicas * max(1, batch // replicas)}"
        )
    logging.info("global batch %d = %s per replica x %d replicas", batch,
                 batch // replicas if batch % replicas == 0 else f"{batch / replicas:.3g}",
                 replicas)  # fmt: skip


def scope(ctx):
    """The strategy's scope to build and train models in (a no-op for `--strategy=default`)."""
    return ctx.strategy.scope() if ctx.flags["strategy"] != "default" else contextlib.nullcontext()


def sharded(ctx, dataset):
    """`dataset` split across workers element-wise (auto-shard by DATA) under multiworker.

    Every worker builds the same seeded pipeline and keeps its replicas' share
    of each global batch. By FILE would need a file-reader source (e.g.
    TFRecord); the arrays and the `dir:` file-name lists are not one, so TF
    would fall back to DATA anyway (with a warning).
    """
    if ctx.flags["strategy"] != "multiworker":
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def backup_dir(ctx, stage):
    """Per-epoch checkpoints of a stage's training phases under multiworker (`BackupAndRestore`)."""
    if ctx.flags["strategy"] != "multiworker" or not stage:
        return None
    return os.path.join(ctx.runner.output_dir, RESUME_DIR, stage, "backup")


def worker_dir(values):
    """The folder a non-chief worker writes to instead of `output_dir`; `None` on the chief.

    Under `--strategy=multiworker` only the chief (`tfkdp.runtime.is_chief`)
    writes stage outputs, reports, artifacts and TensorBoard logs to
    `output_dir`. Every other worker keeps its own stage state, checkpoints
    and logs in `<tmp>/tfkdp-<task type><index>-<hash of output_dir>`: the
    same folder when the worker is restarted with the same TF_CONFIG, so it
    resumes as the chief does; `workflow.run` removes it when the worker
    finishes.
    """
    if values.get("strategy") != "multiworker":
        return None
    from tfkdp import runtime

    config = runtime.parse_tf_config()
    if runtime.is_chief(config):
        return None
    key = hashlib.sha1(os.path.abspath(values["output_dir"]).encode("utf-8")).hexdigest()[:12]
    task = config["task"]
    return os.path.join(tempfile.gettempdir(), f"tfkdp-{task['type']}{task['index']}-{key}")


def barrier(ctx):
    """Under multiworker, waits until every worker gets here (one all-reduce).

    A worker that leaves while the chief still exports makes the chief's
    process hang at exit (TensorFlow's coordination service waits for it),
    so the workers wait for the chief and all leave together.
    """
    if ctx.flags["strategy"] == "multiworker":
        strategy = ctx.strategy
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)

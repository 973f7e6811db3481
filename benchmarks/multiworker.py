"""Scale-out (#20): steps/second of the KDP step on 1 and 2 local MultiWorkerMirroredStrategy workers.

Each worker is a process on 127.0.0.1 with its own TF_CONFIG and one CPU
device (one intra-op thread), so "2 workers" is two replicas that all-reduce
their gradients over gRPC every step, as two hosts would. The step is the
`Distiller` step with the ADMM term (`tfkdp.ADMM`: Z/U update every
`--update-every` steps, once, cross-replica): a resnet8 teacher distilled into
a copy of itself. Weak scaling: the per-replica batch is fixed, the global
batch is `per-replica batch x workers`.

    .venv/bin/python -m benchmarks.multiworker --steps 20

Prints a table and writes benchmarks/results/multiworker.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster sizes")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing)")
    parser.add_argument("--batch-per-replica", type=int, default=64, help="images per replica")
    parser.add_argument("--image-size", type=int, default=28, help="square grayscale images")
    parser.add_argument("--width", type=int, default=8, help="resnet8 base width")
    parser.add_argument("--update-every", type=int, default=4, help="ADMM Z/U update period")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cluster size")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "multiworker.json"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON task
    return parser.parse_args(argv)


def _worker(args):
    """One worker: builds the KDP step under the strategy, times it, prints one JSON line (chief)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    from tfkdp import runtime

    strategy = runtime.multiworker_strategy()  # before any other TensorFlow work
    import keras
    import numpy as np

    from benchmarks import common
    from tfkdp import models
    from tfkdp.distill.distiller import Distiller
    from tfkdp.pruning.analysis import channel_groups
    from tfkdp.pruning.sparsity.admm import ADMM

    replicas = strategy.num_replicas_in_sync
    global_batch = args.batch_per_replica * replicas
    rng = np.random.default_rng(0)
    shape = (args.image_size, args.image_size, 1)
    x = rng.uniform(0, 1, size=(global_batch * 4, *shape)).astype("float32")
    y = (np.arange(len(x)) % 10).astype("int32")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .repeat()
        .batch(global_batch, drop_remainder=True)
        .with_options(options)
    )
    keras.utils.set_random_seed(0)
    with strategy.scope():
        teacher = models.get("resnet8", input_shape=shape, num_classes=10, width=args.width)
        student = keras.models.clone_model(teacher)
        student.set_weights(teacher.get_weights())
        keep = {g.id: max(1, g.size // 2) for g in channel_groups(student) if g.prunable}
        admm = ADMM(student, keep, rho=1e-3, update_every=args.update_every)
        distiller = Distiller(teacher, student, sparsity=admm)
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=runtime.default_jit_compile("auto"),
        )
    timed = common.timed_step_ends(distiller, data, args.steps, args.warmup)
    seconds = timed[-1] - timed[0]
    result = {
        "workers": int(strategy.cluster_resolver.cluster_spec().num_tasks("worker")),
        "replicas": replicas,
        "global_batch": global_batch,
        "timed_steps": len(timed) - 1,
        "seconds": seconds,
        "steps_per_second": (len(timed) - 1) / seconds,
        "images_per_second": (len(timed) - 1) * global_batch / seconds,
        "admm_step": int(admm.step.numpy()),
    }
    if runtime.is_chief():
        print("RESULT " + json.dumps(result), flush=True)


def _run_cluster(n, args):
    from tfkdp import runtime

    ports = runtime.free_ports(n)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    passed = [
        f"--steps={args.steps}", f"--warmup={args.warmup}",
        f"--batch-per-replica={args.batch_per_replica}", f"--image-size={args.image_size}",
        f"--width={args.width}", f"--update-every={args.update_every}",
    ]  # fmt: skip
    procs = []
    for index in range(n):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "benchmarks.multiworker", "--worker", str(index), *passed],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    deadline = time.time() + args.timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"a worker of the {n}-worker run failed:\n{out[-4000:]}")
    lines = [line for line in outputs[0].splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(
            f"the chief of the {n}-worker run printed no result:\n{outputs[0][-4000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None):
    from tfkdp import onednn

    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    args = _parse(argv)
    if args.worker is not None:
        _worker(args)
        return
    from benchmarks import common

    rows = []
    for n in args.workers:
        start = time.time()
        row = _run_cluster(n, args)
        row["wall_seconds"] = time.time() - start
        rows.append(row)
    base = rows[0]["images_per_second"]
    for row in rows:
        row["images_per_second_vs_first"] = row["images_per_second"] / base
    columns = ["workers", "replicas", "global_batch", "timed_steps", "steps_per_second",
               "images_per_second", "images_per_second_vs_first"]  # fmt: skip
    print(common.markdown_table(rows, columns))
    payload = {
        "command": "python -m benchmarks.multiworker " + " ".join(sys.argv[1:]),
        "cpu": common.cpu_name(), "cpu_count": os.cpu_count(),
        "model": f"resnet8 width {args.width}, {args.image_size}x{args.image_size}x1, 10 classes",
        "step": "Distiller (SoftTargetKD) + ADMM, SGD momentum 0.9",
        "batch_per_replica": args.batch_per_replica, "warmup_steps": args.warmup,
        "rows": rows,
    }  # fmt: skip
    common.write_json(args.output, payload)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""Scale-out (#20): time of one KDP step with and without XLA and mixed precision.

The step is the `Distiller` step with the ADMM term (`tfkdp.ADMM`, its Z/U
update inside the compiled step every `--update-every` steps): a resnet
teacher distilled into a copy of itself. Rows: float32 eager-graph (no XLA),
float32 + XLA, and — on a GPU only — mixed_float16 and mixed_bfloat16, each
with XLA. On a machine without a GPU it says so and times the CPU rows only;
no GPU number is written there.

    .venv/bin/python -m benchmarks.gpu_check --steps 20

Prints a table and writes benchmarks/results/gpu_check.json.
"""

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import models, onednn, runtime  # noqa: E402
from tfkdp.distill.distiller import Distiller  # noqa: E402
from tfkdp.pruning.analysis import channel_groups  # noqa: E402
from tfkdp.pruning.sparsity.admm import ADMM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", help="zoo model (teacher and student)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing)")
    parser.add_argument("--update-every", type=int, default=4, help="ADMM Z/U update period")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "gpu_check.json"))
    return parser.parse_args(argv)


def time_step(args, policy, jit_compile):
    """Median and mean ms of one KDP optimizer step (after `--warmup` steps)."""
    keras.backend.clear_session()
    previous = runtime.set_mixed_precision(policy)
    try:
        keras.utils.set_random_seed(0)
        shape = (args.image_size, args.image_size, args.channels)
        teacher = models.get(args.model, input_shape=shape, num_classes=10)
        student = keras.models.clone_model(teacher)
        student.set_weights(teacher.get_weights())
        keep = {g.id: max(1, g.size // 2) for g in channel_groups(student) if g.prunable}
        admm = ADMM(student, keep, rho=1e-3, update_every=args.update_every)
        distiller = Distiller(teacher, student, sparsity=admm)
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit_compile,
        )
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, size=(args.batch_size * 2, *shape)).astype("float32")
        y = (np.arange(len(x)) % 10).astype("int32")
        data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(args.batch_size)
        ends = common.timed_step_ends(distiller, data, args.steps, args.warmup)
        durations = np.diff(ends) * 1000.0
        return {
            "policy": policy, "xla": bool(jit_compile), "ms_median": statistics.median(durations),
            "ms_mean": float(np.mean(durations)), "timed_steps": len(durations),
            "images_per_second": args.batch_size * 1000.0 / statistics.median(durations),
            "admm_step": int(admm.step.numpy()),
        }  # fmt: skip
    finally:
        keras.mixed_precision.set_global_policy(previous)


def main(argv=None):
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    args = _parse(argv)
    gpus = tf.config.list_physical_devices("GPU")
    device = "GPU" if gpus else "CPU"
    if not gpus:
        print("no GPU visible to TensorFlow: timing the CPU only (float32, without and with XLA); "
              "the mixed-precision rows need a GPU and are not measured")  # fmt: skip
    configs = [("none", False), ("none", True)]
    if gpus:
        configs += [("mixed_float16", True), ("mixed_bfloat16", True)]
    rows = []
    for policy, xla in configs:
        row = time_step(args, policy, xla)
        row["device"] = device
        rows.append(row)
        print(f"{device} {policy:<14} xla={xla!s:<5} {row['ms_median']:.1f} ms/step", flush=True)
    base = rows[0]["ms_median"]
    for row in rows:
        row["speedup_vs_float32_no_xla"] = base / row["ms_median"]
    columns = ["device", "policy", "xla", "ms_median", "ms_mean", "images_per_second",
               "speedup_vs_float32_no_xla"]  # fmt: skip
    print(common.markdown_table(rows, columns))
    payload = {
        "command": "python -m benchmarks.gpu_check " + " ".join(argv or []),
        "gpu": [d.name for d in gpus] or None, "cpu": common.cpu_name(), "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "model": f"{args.model}, {args.image_size}x{args.image_size}x{args.channels}, 10 classes",
        "batch_size": args.batch_size, "step": "Distiller (SoftTargetKD) + ADMM, SGD momentum 0.9",
        "rows": rows,
    }  # fmt: skip
    common.write_json(args.output, payload)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

"""Distillation benchmark on real Fashion-MNIST.

1. Accuracy: students resnet8 and resnet14 trained alone and with each KD loss
   (SoftTargetKD, HintLoss, AttentionTransfer, DecoupledKD) from one cached
   resnet32 teacher (`benchmarks.common.get_teacher`); same data, epochs,
   optimizer and seed for every row.
2. Step-time overhead: one `Distiller` train step vs (a plain student train
   step + a teacher forward pass), measured in the same process with
   interleaved repeats; the target is a ratio <= 1.10.

Run from the repository root (the machine is shared: hold the lock):

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.distill

Flags: `--epochs` (default 2), `--seeds` (default 0; e.g. `0,1,2`),
`--train_subset` (default 20000 images; 0 = all 60k), `--part` (`all`,
`accuracy`, `overhead`; a partial run keeps the other part's numbers). Writes
`benchmarks/results/distill.json` and `benchmarks/results/distill.md`.
"""

import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import losses as kd  # noqa: E402
from tfkdp import models, onednn  # noqa: E402
from tfkdp.distill.distiller import Distiller  # noqa: E402
from tfkdp.train import recipe as training  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ["all", "accuracy", "overhead"], "Which benchmark to run.")
flags.DEFINE_integer("epochs", 2, "Student training epochs (same for every row).")
flags.DEFINE_list("seeds", ["0"], "Student seeds; the table reports mean ± std over them.")
flags.DEFINE_integer(
    "train_subset", 20000, "Train students on the first N training images (0: all 60k)."
)
flags.DEFINE_list("students", ["resnet8", "resnet14"], "Student architectures.")
flags.DEFINE_string("teacher", "resnet32", "Teacher architecture (trained once, cached).")
flags.DEFINE_integer("teacher_epochs", None, "Teacher epochs (default: get_teacher's).")
flags.DEFINE_float("learning_rate", 0.05, "Peak learning rate (SGD Nesterov, cosine).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_list(
    "methods", ["alone", "SoftTargetKD", "HintLoss", "AttentionTransfer", "DecoupledKD"],
    "Accuracy rows to (re)run; with --part=accuracy, rows of other methods are kept from "
    "the existing JSON when its settings match.",
)
flags.DEFINE_integer("overhead_repeats", 7, "Interleaved repeats of the step-time blocks.")
flags.DEFINE_integer("overhead_steps", 20, "Steps per timed block.")

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
METHOD_KEYS = ("alone", "SoftTargetKD", "HintLoss", "AttentionTransfer", "DecoupledKD")


def _last_block(model, stage):
    """Name of the output of the last residual block of `stage` in a resnet_cifar."""
    names = [layer.name for layer in model.layers if layer.name.startswith(f"stage{stage}_block")]
    blocks = sorted({int(n.split("_")[1][len("block"):]) for n in names})
    return f"stage{stage}_block{blocks[-1]}_out"


def methods(teacher, student):
    """(name, losses, loss weights, task weight, settings) per KD method.

    Weights follow the published CIFAR settings of each method (mdistiller's
    configs) where they train here: KD 0.1·CE + 0.9·KD(T=4); AT CE + 1·AT
    (β=1000, β/2·mean as in Zagoruyko's code, all three stage outputs); DKD
    CE + DKD(α=1, β=8, T=4) with a linear warm-up of its weight over the first
    10% of steps. FitNets (stage-2 output, 1×1 connector) uses CE + 1·hint:
    mdistiller's weight 100 made the loss NaN within the first epoch at this
    learning rate (initial hint MSE ≈ 4 against these teacher features).
    """
    hint = kd.HintLoss(_last_block(teacher, 2), _last_block(student, 2), connector=True)
    pairs = [(_last_block(teacher, s), _last_block(student, s)) for s in (1, 2, 3)]
    return [
        ("SoftTargetKD", [kd.SoftTargetKD(4.0)], [0.9], 0.1, "T=4, 0.1·CE + 0.9·KD"),
        ("HintLoss", [hint], [1.0], 1.0, "stage-2 hint, 1×1 connector, CE + 1·MSE"),
        ("AttentionTransfer", [kd.AttentionTransfer(pairs)], [1.0], 1.0, "3 stages, β=1000, CE + AT"),
        ("DecoupledKD", [kd.DecoupledKD(1.0, 8.0, 4.0)], [1.0], 1.0, "α=1, β=8, T=4, warm-up 10%"),
    ]


class LinearWarmup(keras.callbacks.Callback):
    """Ramps `distiller.distillation_loss_weights[index]` from 0 to `target` over `steps`."""

    def __init__(self, index, target, steps):
        super().__init__()
        self.index, self.target, self.steps = index, target, max(1, steps)

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations)
        self.model.distillation_loss_weights[self.index].assign(
            self.target * min(1.0, (step + 1) / self.steps)
        )


def _student(name, seed):
    keras.utils.set_random_seed(seed)
    return models.get(name)


def run_accuracy(teacher):
    rows = []
    seeds = [int(s) for s in FLAGS.seeds]
    for student_name in FLAGS.students:
        for method_index, key in enumerate(METHOD_KEYS):
            if key not in FLAGS.methods:
                continue
            accs, seconds = [], []
            label = settings = None
            for seed in seeds:
                train, _ = common.datasets(FLAGS.batch_size, seed, FLAGS.train_subset or None)
                total_steps = training.steps_in(train) * FLAGS.epochs
                student = _student(student_name, seed)
                start = time.time()
                if method_index == 0:
                    label, settings = "student alone", "CE"
                    training.train_classifier(
                        student, train, epochs=FLAGS.epochs, learning_rate=FLAGS.learning_rate,
                        verbose=0,
                    )  # fmt: skip
                else:
                    label, losses, weights, task_weight, settings = methods(teacher, student)[
                        method_index - 1
                    ]
                    distiller = Distiller(
                        teacher, student, losses, weights, student_loss_weight=task_weight
                    )
                    distiller.compile(
                        optimizer=training.make_optimizer(total_steps, FLAGS.learning_rate),
                        loss=CE,
                        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                    )
                    callbacks = []
                    if label == "DecoupledKD":
                        callbacks.append(LinearWarmup(0, weights[0], int(0.1 * total_steps)))
                    distiller.fit(
                        train, epochs=FLAGS.epochs, callbacks=callbacks, verbose=0, shuffle=False
                    )
                seconds.append(time.time() - start)
                accs.append(common.test_accuracy(student))
                print(
                    f"{student_name:9s} {label:18s} seed {seed}: test acc {accs[-1]:.4f} "
                    f"({seconds[-1]:.0f} s)",
                    flush=True,
                )
            rows.append(
                {
                    "student": student_name,
                    "method": label,
                    "settings": settings,
                    "epochs": FLAGS.epochs,
                    "seeds": seeds,
                    "test_accuracy": float(np.mean(accs)),
                    "test_accuracy_std": float(np.std(accs)) if len(accs) > 1 else None,
                    "test_accuracy_per_seed": accs,
                    "train_seconds": float(np.mean(seconds)),
                }
            )
    return rows


def _timed_block(function, iterator, steps):
    """Seconds per call of a compiled Keras step function over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        outputs = function(iterator)
    keras.tree.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, outputs)
    return (time.perf_counter() - start) / steps


def run_overhead(teacher):
    (x_train, y_train), _ = common.load_fashion_mnist_arrays()
    batch = FLAGS.batch_size
    x = (x_train[:batch, ..., None] / 255.0).astype("float32")
    y = y_train[:batch].astype("int32")
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat().prefetch(4)

    student_plain = _student("resnet8", 0)
    student_plain.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=CE)
    student_plain.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)  # trace + build

    x_tensor = tf.constant(x)
    # The same compiled forward pass the Distiller runs (training=False), as its own tf.function.
    teacher_forward = tf.function(lambda images: teacher(images, training=False))
    teacher_forward(x_tensor)
    variants = {}
    for label, make_losses in (
        ("SoftTargetKD", lambda s: [kd.SoftTargetKD(4.0)]),
        (
            "SoftTargetKD + HintLoss",
            lambda s: [
                kd.SoftTargetKD(4.0),
                kd.HintLoss(_last_block(teacher, 2), _last_block(s, 2), connector=True),
            ],
        ),
    ):
        student = _student("resnet8", 0)
        losses = make_losses(student)
        distiller = Distiller(teacher, student, losses, [0.5] * len(losses))
        distiller.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=CE)
        distiller.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
        variants[label] = distiller

    functions = {
        "student_step": (student_plain.train_function, iter(dataset)),
        "teacher_forward": (lambda _: teacher_forward(x_tensor), None),
    }
    for label, distiller in variants.items():
        functions[f"distiller_step[{label}]"] = (distiller.train_function, iter(dataset))
    times = {name: [] for name in functions}
    names = list(functions)
    for repeat in range(FLAGS.overhead_repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotate
        for name in order:
            function, iterator = functions[name]
            times[name].append(_timed_block(function, iterator, FLAGS.overhead_steps))
    median = {name: statistics.median(values) for name, values in times.items()}
    baseline = median["student_step"] + median["teacher_forward"]
    rows = []
    for label in variants:
        step = median[f"distiller_step[{label}]"]
        rows.append(
            {
                "losses": label,
                "student": "resnet8",
                "teacher": FLAGS.teacher,
                "batch_size": batch,
                "distiller_step_ms": 1000 * step,
                "student_step_ms": 1000 * median["student_step"],
                "teacher_forward_ms": 1000 * median["teacher_forward"],
                "ratio": step / baseline,
                "repeats": FLAGS.overhead_repeats,
                "steps_per_repeat": FLAGS.overhead_steps,
            }
        )
        print(
            f"overhead [{label}]: distiller {1000 * step:.1f} ms vs student "
            f"{1000 * median['student_step']:.1f} + teacher {1000 * median['teacher_forward']:.1f}"
            f" ms -> ratio {step / baseline:.3f}",
            flush=True,
        )
    return rows, {name: [1000 * v for v in values] for name, values in times.items()}


def _markdown(result):
    md = ["# Distillation benchmark (`benchmarks/distill.py`)", ""]
    flags_ = result["flags"]
    teacher = result["teacher"]
    if "overhead" in result:
        first = result["overhead"][0]
        md += [
            "## Step-time overhead",
            "",
            f"Distiller train step vs a plain student train step + a teacher forward pass "
            f"(student resnet8, teacher {teacher['name']}, batch {first['batch_size']}, "
            f"{result['machine']['cpus']} CPU cores shared with other jobs; medians of "
            f"{first['repeats']} interleaved blocks of {first['steps_per_repeat']} steps). "
            "Target: ratio <= 1.10.",
            "",
            common.markdown_table(
                result["overhead"],
                ["losses", "distiller_step_ms", "student_step_ms", "teacher_forward_ms", "ratio"],
            ),
            "",
        ]
    if "accuracy" in result:
        rows = []
        for row in result["accuracy"]:
            std = row["test_accuracy_std"]
            acc = f"{row['test_accuracy']:.4f}" + (f" ± {std:.4f}" if std is not None else "")
            rows.append(dict(row, **{"test accuracy": acc}))
        acc_flags = result["accuracy_flags"]
        md += [
            "## Test accuracy on Fashion-MNIST (10k test images)",
            "",
            f"Teacher {teacher['name']} (width {teacher['width']}, {teacher['epochs']} epochs): "
            f"test accuracy {teacher['test_accuracy']:.4f}. Students (width 16) trained "
            f"{acc_flags['epochs']} epoch(s) on {acc_flags['train_images']} training images, "
            f"seeds {acc_flags['seeds']} ({len(acc_flags['seeds'])} seed(s)); every row uses "
            f"the same data order and recipe: {flags_['optimizer']}, peak LR "
            f"{acc_flags['learning_rate']}, batch {acc_flags['batch_size']}, pad-crop + flip.",
            "",
            common.markdown_table(
                rows, ["student", "method", "settings", "test accuracy", "train_seconds"]
            ),
            "",
            "FitNets' published weight (CE + 100·MSE) turned the loss into NaN within the "
            "first epoch at this learning rate, so HintLoss uses weight 1. `train_seconds` "
            "include tracing and share the machine with other jobs.",
            "",
        ]
        if len(acc_flags["seeds"]) == 1 or acc_flags["epochs"] < 10:
            md += [
                f"Caveat: {len(acc_flags['seeds'])} seed(s) and {acc_flags['epochs']} short "
                "epoch(s) give no variance estimate and students far from convergence; these "
                "rows show that every loss trains end to end, not which loss is best. To rank "
                "them: `--epochs 15 --train_subset 0 --seeds 0,1,2`.",
                "",
            ]
    for run in result["runs"]:
        md.append(
            f"Run {run['finished']}: part {run['part']}, methods {run['methods']}, "
            f"wall time {run['wall_seconds']:.0f} s."
        )
        md.append("")
    return "\n".join(md) + "\n"


def main(argv):
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    del argv
    wall = time.time()
    json_path = os.path.join(common.RESULTS_DIR, "distill.json")
    result = {}
    if FLAGS.part != "all" and os.path.exists(json_path):
        with open(json_path) as f:
            result = json.load(f)  # keep the other part's numbers
    kwargs = {} if FLAGS.teacher_epochs is None else {"epochs": FLAGS.teacher_epochs}
    teacher, teacher_info = common.get_teacher(FLAGS.teacher, **kwargs)
    print(f"teacher {FLAGS.teacher}: {teacher_info}", flush=True)
    result.update(
        {
            "benchmark": "distill",
            "teacher": teacher_info,
            "flags": {"optimizer": "SGD Nesterov 0.9, warm-up + cosine, weight decay 5e-4"},
            "machine": {
                "cpus": os.cpu_count(), "gpus": len(tf.config.list_physical_devices("GPU")),
            },
        }  # fmt: skip
    )
    if FLAGS.part in ("all", "overhead"):
        result["overhead"], result["overhead_raw_ms"] = run_overhead(teacher)
    if FLAGS.part in ("all", "accuracy"):
        accuracy_flags = {
            "epochs": FLAGS.epochs,
            "seeds": [int(s) for s in FLAGS.seeds],
            "train_images": FLAGS.train_subset or 60000,
            "students": FLAGS.students,
            "learning_rate": FLAGS.learning_rate,
            "batch_size": FLAGS.batch_size,
        }
        rows = run_accuracy(teacher)
        if result.get("accuracy_flags") == accuracy_flags:  # merge: replace re-run rows only
            fresh = {(r["student"], r["method"]): r for r in rows}
            kept = {(r["student"], r["method"]): r for r in result["accuracy"]}
            kept.update(fresh)
            order = {label: i for i, label in enumerate(
                ["student alone", "SoftTargetKD", "HintLoss", "AttentionTransfer", "DecoupledKD"]
            )}  # fmt: skip
            rows = sorted(
                kept.values(),
                key=lambda r: (FLAGS.students.index(r["student"]), order[r["method"]]),
            )
        else:
            result["runs"] = [run for run in result.get("runs", []) if run["part"] == "overhead"]
        result["accuracy"] = rows
        result["accuracy_flags"] = accuracy_flags
    result.setdefault("runs", []).append(
        {
            "part": FLAGS.part,
            "methods": FLAGS.methods if FLAGS.part != "overhead" else [],
            "wall_seconds": round(time.time() - wall, 1),
            "finished": time.strftime("%Y-%m-%d %H:%M"),
        }
    )
    markdown = _markdown(result)
    common.write_json(json_path, result)
    common.write_text(os.path.join(common.RESULTS_DIR, "distill.md"), markdown)
    print(markdown)


if __name__ == "__main__":
    app.run(main)

"""KDP benchmark on real Fashion-MNIST: teacher vs prune_only vs kd_only vs kdp.

(a) the unpruned teacher (resnet32, cached by `benchmarks.common.get_teacher`);
(b) `prune_only`: a copy of the teacher, L1 global plan at the MAC target,
    plain fine-tune;
(c) `kd_only`: a dense, narrower resnet32 with about the pruned MACs, distilled
    from scratch;
(d) `kdp`: a copy of the teacher, ADMM + KD, hard prune, masked KD fine-tune.
(b)–(d) train the same total number of epochs on the same data. Also: step
time of the Distiller with and without the ADMM sparsity term, interleaved in
one process, as a ratio.

Run once, serialised with the other benchmarks:

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.kdp

Writes benchmarks/results/kdp.json and kdp.md.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import admm as admm_lib  # noqa: E402
from tfkdp import metrics, models, training  # noqa: E402
from tfkdp.distiller import Distiller  # noqa: E402
from tfkdp.methods import kdp  # noqa: E402


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.51, help="MAC reduction target")
    parser.add_argument("--epochs", type=int, default=2, help="total epochs per method")
    parser.add_argument("--admm-epochs", type=int, default=1, help="kdp: ADMM epochs (rest: fine-tune)")
    parser.add_argument("--train-subset", type=int, default=40000, help="training images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-steps", type=int, default=10, help="steps per timing round")
    parser.add_argument("--timing-rounds", type=int, default=5)
    return parser.parse_args()


def _evaluate(model):
    return {
        "test_accuracy": common.test_accuracy(model),
        "macs": metrics.count_macs(model),
        "params": metrics.count_params(model),
    }


def _narrow_resnet(depth, target_macs, max_width):
    """The resnet of this depth whose MACs are closest to `target_macs` (width search)."""
    best = None
    for width in range(4, max_width + 1):
        macs = metrics.count_macs(models.resnet_cifar(depth, width=width))
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (width, macs)
    keras.backend.clear_session()
    return best


def _step_time_ratio(teacher, keep, train, steps, rounds, learning_rate):
    """Median step time of the Distiller with the ADMM term over the one without."""
    batches = list(train.take(steps))
    fixed = tf.data.Dataset.from_tensor_slices(
        (np.concatenate([b[0].numpy() for b in batches]), np.concatenate([b[1].numpy() for b in batches]))
    ).batch(int(batches[0][0].shape[0]))
    runs = {}
    for name in ("plain", "admm"):
        student = kdp.copy_model(teacher)
        sparsity = admm_lib.ADMM(student, keep) if name == "admm" else None
        distiller = Distiller(teacher, student, sparsity=sparsity)
        distiller.compile(
            optimizer=training.make_optimizer(10**6, learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        distiller.fit(fixed.take(2), epochs=1, verbose=0)  # trace and warm up
        runs[name] = distiller
    times = {"plain": [], "admm": []}
    for _ in range(rounds):
        for name in ("plain", "admm"):  # interleaved: both see the same machine load
            start = time.perf_counter()
            runs[name].fit(fixed, epochs=1, verbose=0)
            times[name].append((time.perf_counter() - start) / steps)
    plain = statistics.median(times["plain"])
    admm = statistics.median(times["admm"])
    return {
        "plain_step_ms": 1000 * plain,
        "admm_step_ms": 1000 * admm,
        "ratio": admm / plain,
        "rounds": rounds,
        "steps_per_round": steps,
    }


def main():
    args = _parse()
    wall = time.time()
    keras.utils.set_random_seed(args.seed)
    teacher, teacher_info = common.get_teacher()  # resnet32, width 16, 4 epochs, cached
    train, _ = common.datasets(args.batch_size, args.seed, args.train_subset or None)
    finetune_epochs = args.epochs - args.admm_epochs
    rows, results = [], {}

    a = _evaluate(teacher)
    recalibrated = kdp.copy_model(teacher)
    kdp.recalibrate_batchnorm(recalibrated, train, 100)
    a["test_accuracy_bn_recalibrated"] = common.test_accuracy(recalibrated)
    results["teacher"] = {**a, "train_seconds": teacher_info["train_seconds"], "epochs": teacher_info["epochs"]}
    print(f"(a) teacher: {a}", flush=True)

    common_kwargs = dict(
        target_macs_reduction=args.target, admm_epochs=args.admm_epochs,
        finetune_epochs=finetune_epochs, learning_rate=args.learning_rate, verbose=2,
    )  # fmt: skip
    for key, method in (("prune_only", "prune_only"), ("kdp", "kdp")):
        keras.utils.set_random_seed(args.seed)
        start = time.time()
        small, plan, history = kdp.compress(teacher, None, train, method=method, **common_kwargs)
        seconds = time.time() - start
        results[key] = {**_evaluate(small), "train_seconds": round(seconds, 1), "groups_pruned": len(plan)}
        results[key]["macs_reduction"] = 1.0 - results[key]["macs"] / a["macs"]
        if key == "kdp":
            results[key]["final_admm_sparsity_loss"] = history["admm"]["sparsity_loss"][-1]
            kdp_plan = plan
        print(f"({key}) {results[key]}", flush=True)
        keras.backend.clear_session()

    width, _ = _narrow_resnet(32, results["kdp"]["macs"], 16)
    keras.utils.set_random_seed(args.seed)
    student = models.resnet_cifar(32, width=width)
    start = time.time()
    kd_kwargs = dict(common_kwargs)
    kd_kwargs.pop("target_macs_reduction")
    small, _, _ = kdp.compress(teacher, student, train, method="kd_only", **kd_kwargs)
    results["kd_only"] = {**_evaluate(small), "train_seconds": round(time.time() - start, 1), "width": width}
    results["kd_only"]["macs_reduction"] = 1.0 - results["kd_only"]["macs"] / a["macs"]
    print(f"(kd_only) {results['kd_only']}", flush=True)
    keras.backend.clear_session()

    keep = {gid: len(idx) for gid, idx in kdp_plan.items()}
    results["step_time"] = _step_time_ratio(
        teacher, keep, train, args.timing_steps, args.timing_rounds, args.learning_rate
    )
    print(f"step time: {results['step_time']}", flush=True)

    teacher_acc = a["test_accuracy"]
    kdp_acc = results["kdp"]["test_accuracy"]
    results["goals"] = {
        "kdp_within_0.5pt_of_teacher": bool(teacher_acc - kdp_acc <= 0.005),
        "kdp_ahead_of_prune_only": bool(kdp_acc > results["prune_only"]["test_accuracy"]),
        "kdp_ahead_of_kd_only": bool(kdp_acc > results["kd_only"]["test_accuracy"]),
        "admm_step_overhead_le_10pct": bool(results["step_time"]["ratio"] <= 1.10),
    }
    results["setup"] = {
        "dataset": "Fashion-MNIST (real), test set 10k",
        "train_images": args.train_subset or 60000,
        "epochs_per_method": args.epochs,
        "kdp_admm_epochs": args.admm_epochs,
        "kdp_finetune_epochs": finetune_epochs,
        "target_macs_reduction": args.target,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seeds": [args.seed],
        "criterion": "l1 (global allocation)",
        "bn_recalibration_batches": 100,
        "teacher": f"resnet32 width 16, {teacher_info['epochs']} epochs on 60k (cached)",
        "cpu_cores": os.cpu_count(),
        "wall_seconds": round(time.time() - wall, 1),
    }

    for label, key in (("(a) teacher", "teacher"), ("(b) prune_only", "prune_only"),
                       ("(c) kd_only (dense)", "kd_only"), ("(d) kdp", "kdp")):  # fmt: skip
        r = results[key]
        rows.append({
            "model": label,
            "test acc": round(100 * r["test_accuracy"], 2),
            "MACs (M)": round(r["macs"] / 1e6, 2),
            "MAC reduction": round(r.get("macs_reduction", 0.0), 3),
            "params (k)": round(r["params"] / 1e3, 1),
            "train s": r["train_seconds"],
        })  # fmt: skip
    table = common.markdown_table(rows, list(rows[0]))
    st = results["step_time"]
    setup = results["setup"]
    text = (
        "## KDP (ADMM distillation with pruning) on Fashion-MNIST\n\n"
        f"Command: `flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.kdp`. "
        f"{setup['train_images']} training images, {args.epochs} epochs per method "
        f"(kdp: {args.admm_epochs} ADMM + {finetune_epochs} fine-tune), batch {args.batch_size}, "
        f"peak LR {args.learning_rate}, 1 seed ({args.seed}), {setup['cpu_cores']} shared CPU cores; "
        f"teacher {setup['teacher']}. BN statistics re-estimated over 100 batches at the end of "
        f"(b)–(d); the teacher's test accuracy with the same re-estimation is "
        f"{100 * a['test_accuracy_bn_recalibrated']:.2f} %.\n\n"
        f"{table}\n\n"
        f"ADMM step-time overhead over the plain KD step (interleaved, median of {st['rounds']} "
        f"rounds × {st['steps_per_round']} steps): {st['plain_step_ms']:.0f} ms → "
        f"{st['admm_step_ms']:.0f} ms, ratio **{st['ratio']:.3f}**.\n\n"
        "Goals at this budget: "
        + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in results["goals"].items())
        + f". Wall time {setup['wall_seconds']:.0f} s.\n"
    )
    common.write_json(os.path.join(common.RESULTS_DIR, "kdp.json"), results)
    common.write_text(os.path.join(common.RESULTS_DIR, "kdp.md"), text)
    print(text)


if __name__ == "__main__":
    main()

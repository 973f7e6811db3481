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
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import (  # noqa: E402
    methods,
    metrics,
    models,
    onednn,
)
from tfkdp import pruning as pruner  # noqa: E402
from tfkdp.distill.distiller import Distiller  # noqa: E402
from tfkdp.pruning.sparsity import admm as admm_lib  # noqa: E402
from tfkdp.train import copy_model, recalibrate_batchnorm  # noqa: E402
from tfkdp.train import recipe as training  # noqa: E402
from tfkdp.train.phases import Training  # noqa: E402


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.51, help="MAC reduction target")
    parser.add_argument(
        "--teacher-epochs", type=int, default=4, help="epochs of the cached resnet32 teacher"
    )
    parser.add_argument("--epochs", type=int, default=4, help="total epochs per method")
    parser.add_argument(
        "--admm-epochs", type=int, default=2, help="kdp: ADMM epochs (rest: fine-tune)"
    )
    parser.add_argument("--train-subset", type=int, default=0, help="training images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="one run of (b)-(d) each"
    )
    parser.add_argument("--name", default="kdp", help="results file stem under benchmarks/results")
    parser.add_argument(
        "--timing-only", action="store_true", help="only the ADMM step-time ratio (no training)"
    )
    parser.add_argument("--timing-steps", type=int, default=10, help="steps per timing round")
    parser.add_argument("--timing-rounds", type=int, default=5)
    return parser.parse_args()


def _evaluate(model):
    return {
        "test_accuracy": common.test_accuracy(model),
        "macs": metrics.count_macs(model),
        "params": metrics.count_params(model),
    }


def _step_time_ratio(teacher, keep, train, steps, rounds, learning_rate):
    """Median step time of the Distiller with the ADMM term over the one without."""
    batches = list(train.take(steps))
    fixed = tf.data.Dataset.from_tensor_slices(
        (
            np.concatenate([b[0].numpy() for b in batches]),
            np.concatenate([b[1].numpy() for b in batches]),
        )
    ).batch(int(batches[0][0].shape[0]))
    runs = {}
    for name in ("plain", "admm"):
        student = copy_model(teacher)
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


def _compress_all(teacher, args, seed, width):
    """(b) prune_only, (d) kdp and (c) kd_only for one seed: `{method: result}`."""
    train, _ = common.datasets(args.batch_size, seed, args.train_subset or None)
    teacher_macs = metrics.count_macs(teacher)
    options = dict(
        admm_epochs=args.admm_epochs, finetune_epochs=args.epochs - args.admm_epochs,
        training=Training(learning_rate=args.learning_rate, verbose=2),
    )  # fmt: skip
    results = {}
    for method in ("prune_only", "kdp", "kd_only"):
        keras.utils.set_random_seed(seed)
        student, budget = None, methods.Budget.macs(args.target)
        if method == "kd_only":
            student, budget = models.resnet_cifar(32, width=width), None
        start = time.time()
        # The same registry and code path as the pipeline's compress/finetune/strip stages.
        small, plan, history = methods.get(method, **options).compress(
            teacher, student, train, None, budget
        )
        r = {**_evaluate(small), "train_seconds": round(time.time() - start, 1)}
        r["macs_reduction"] = 1.0 - r["macs"] / teacher_macs
        if method == "kd_only":
            r["width"] = width
        else:
            r["groups_pruned"] = len(plan)
        if method == "kdp":
            r["final_admm_sparsity_loss"] = history["admm"]["sparsity_loss"][-1]
        results[method] = r
        print(f"seed {seed} ({method}) {r}", flush=True)
        keras.backend.clear_session()
    return results


def _command_line():
    """The command that produced the results, as recorded in them."""
    return " ".join(["flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.kdp", *sys.argv[1:]])


def main():
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    args = _parse()
    wall = time.time()
    keras.utils.set_random_seed(args.seeds[0])
    teacher, teacher_info = common.get_teacher(epochs=args.teacher_epochs)  # resnet32, cached

    a = _evaluate(teacher)
    train0, _ = common.datasets(args.batch_size, args.seeds[0], args.train_subset or None)
    recalibrated = copy_model(teacher)
    recalibrate_batchnorm(recalibrated, train0, 100)
    a["test_accuracy_bn_recalibrated"] = common.test_accuracy(recalibrated)
    a.update(train_seconds=teacher_info["train_seconds"], epochs=teacher_info["epochs"])
    print(f"(a) teacher: {a}", flush=True)

    # (c)'s dense student: the resnet32 width whose MACs are closest to the pruned model's,
    # known before training because make_plan's cost model is exact.
    plan = pruner.make_plan(teacher, target_macs_reduction=args.target)
    width, _ = common.narrow_resnet(32, pruner.plan_macs(teacher, plan), 16)

    # Step time first (the keep counts are the plan's), so that every seed's results can be
    # written as soon as it finishes: a long run stopped early keeps its finished seeds.
    keep = {gid: len(idx) for gid, idx in plan.items()}
    step_time = _step_time_ratio(
        teacher, keep, train0, args.timing_steps, args.timing_rounds, args.learning_rate
    )
    print(f"step time: {step_time}", flush=True)
    keras.backend.clear_session()
    if args.timing_only:
        common.write_json(
            os.path.join(common.RESULTS_DIR, args.name + ".json"),
            {"step_time": step_time, "command": _command_line(), "teacher_epochs": args.teacher_epochs,
             "batch_size": args.batch_size, "cpu_cores": os.cpu_count()},
        )  # fmt: skip
        return

    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = _compress_all(teacher, args, seed, width)
        _report(args, a, teacher_info, width, per_seed, step_time, wall)


def _report(args, a, teacher_info, width, per_seed, step_time, wall):
    """Writes kdp.json/kdp.md over the seeds finished so far (atomic) and prints the table."""
    seeds = list(per_seed)
    finetune_epochs = args.epochs - args.admm_epochs
    summary = {}
    for key in ("prune_only", "kd_only", "kdp"):
        runs = [per_seed[seed][key] for seed in seeds]
        accs = [r["test_accuracy"] for r in runs]
        summary[key] = {
            "test_accuracy_mean": statistics.fmean(accs),
            "test_accuracy_per_seed": accs,
            "test_accuracy_min": min(accs),
            "test_accuracy_max": max(accs),
            "train_seconds_mean": round(statistics.fmean(r["train_seconds"] for r in runs), 1),
            **{k: runs[0][k] for k in ("macs", "params", "macs_reduction")},
        }
    teacher_acc = a["test_accuracy"]
    kdp_acc = summary["kdp"]["test_accuracy_mean"]
    goals = {
        "kdp_within_0.5pt_of_teacher": bool(teacher_acc - kdp_acc <= 0.005),
        "kdp_ahead_of_prune_only": bool(kdp_acc > summary["prune_only"]["test_accuracy_mean"]),
        "kdp_ahead_of_kd_only": bool(kdp_acc > summary["kd_only"]["test_accuracy_mean"]),
        "admm_step_overhead_le_10pct": bool(step_time["ratio"] <= 1.10),
    }
    setup = {
        "command": _command_line(),
        "dataset": "Fashion-MNIST (real), test set 10k",
        "train_images": args.train_subset or 60000,
        "epochs_per_method": args.epochs,
        "kdp_admm_epochs": args.admm_epochs,
        "kdp_finetune_epochs": finetune_epochs,
        "target_macs_reduction": args.target,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seeds": seeds,
        "seeds_requested": args.seeds,
        "criterion": "l1 (global allocation)",
        "bn_recalibration_batches": 100,
        "teacher": f"resnet32 width 16, {teacher_info['epochs']} epochs on 60k (cached)",
        "cpu_cores": os.cpu_count(),
        "wall_seconds": round(time.time() - wall, 1),
    }
    results = {
        "teacher": a, **summary, "per_seed": per_seed, "step_time": step_time,
        "goals": goals, "setup": setup,
    }  # fmt: skip

    rows = [{
        "model": "(a) teacher", "test acc (mean)": round(100 * teacher_acc, 2), "per seed": "-",
        "MACs (M)": round(a["macs"] / 1e6, 2), "MAC reduction": 0.0,
        "params (k)": round(a["params"] / 1e3, 1), "train s": a["train_seconds"],
    }]  # fmt: skip
    for label, key in (("(b) prune_only", "prune_only"), ("(c) kd_only (dense)", "kd_only"),
                       ("(d) kdp", "kdp")):  # fmt: skip
        r = summary[key]
        rows.append({
            "model": label,
            "test acc (mean)": round(100 * r["test_accuracy_mean"], 2),
            "per seed": " / ".join(f"{100 * x:.2f}" for x in r["test_accuracy_per_seed"]),
            "MACs (M)": round(r["macs"] / 1e6, 2),
            "MAC reduction": round(r["macs_reduction"], 3),
            "params (k)": round(r["params"] / 1e3, 1),
            "train s": r["train_seconds_mean"],
        })  # fmt: skip
    table = common.markdown_table(rows, list(rows[0]))
    text = (
        "## KDP (ADMM distillation with pruning) on Fashion-MNIST\n\n"
        f"Command: `{setup['command']}`. {setup['train_images']} training images, "
        f"{args.epochs} epochs per method (kdp: {args.admm_epochs} ADMM + {finetune_epochs} "
        f"fine-tune), batch {args.batch_size}, peak LR {args.learning_rate}, seeds "
        f"{', '.join(map(str, seeds))} ({len(seeds)} of {len(args.seeds)} requested finished; mean "
        "and per-seed test accuracy), "
        f"{setup['cpu_cores']} CPU cores; teacher {setup['teacher']}; (c) is a dense resnet32 "
        f"of width {width}. BN statistics re-estimated over 100 batches at the end of (b)–(d); "
        "the teacher's test accuracy with the same re-estimation is "
        f"{100 * a['test_accuracy_bn_recalibrated']:.2f} %.\n\n"
        f"{table}\n\n"
        f"ADMM step-time overhead over the plain KD step (interleaved, median of "
        f"{step_time['rounds']} rounds × {step_time['steps_per_round']} steps): "
        f"{step_time['plain_step_ms']:.0f} ms → {step_time['admm_step_ms']:.0f} ms, ratio "
        f"**{step_time['ratio']:.3f}**.\n\n"
        "Goals (on the means): "
        + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items())
        + f". Wall time {setup['wall_seconds']:.0f} s.\n"
    )
    common.write_json(os.path.join(common.RESULTS_DIR, args.name + ".json"), results)
    common.write_text(os.path.join(common.RESULTS_DIR, args.name + ".md"), text)
    print(text)


if __name__ == "__main__":
    main()

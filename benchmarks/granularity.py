"""Weight vs channel pruning under KD on real Fashion-MNIST, at equal non-zero parameters.

For one model of each family (ResNet, DenseNet-BC, EfficientNet-style,
MobileNetV2), a teacher trained here (cached), and per level of non-zero
parameter reduction (default 50 % and 80 %) and seed:

- `channel+KD` (`kdp`): a copy of the teacher, ADMM + KD to a parameter
  budget, hard prune, masked KD fine-tune, strip. Its non-zero parameter
  count N sets the level for the two others;
- `weight+KD` (`weight`, sequential): a copy of the teacher, KD, magnitude
  pruning with KD to the sparsity of the prunable weights that leaves N
  non-zero parameters, KD fine-tune;
- `KD-only` (`kd_only`): a dense, narrower model of the same family with
  about N parameters, distilled from the teacher.

All three train `--epochs` epochs (weight+KD at least 2: KD, then pruning). Each result is exported to
`tflite` and `tflite_sparse`, verified on LiteRT, timed (LiteRT, 1 thread,
interleaved) and sized (file and gzip); Performance Efficiency
(`tfkdp.metrics.performance_efficiency`, the teacher = 1) is given for each
cost. The paper's claim under test: weight pruning keeps more accuracy than
channel pruning under KD (Malihi & Heidemann, ASI 7(4):56, 2024).

Run serialised with the other benchmarks:

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.granularity

Smoke check (minutes): `--train-subset 512 --epochs 1 --teacher-epochs 1
--families resnet --levels 0.5`. Writes benchmarks/results/granularity.json
and granularity.md after every (family, level, seed). The same command run
again resumes: (family, level, seed) cells recorded by the same setup
(`RESUME_KEYS`) with the same teacher are skipped, so more families, levels or
seeds can be added over several runs (`--restart` starts over). Teachers kept
in `benchmarks/teachers/` (`common.kept_or_trained`) make that hold across
machines.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import data, export, methods, metrics, models, onednn  # noqa: E402
from tfkdp.export._atomic import gzip_size_bytes, tree_size_bytes  # noqa: E402
from tfkdp.pruning import unstructured  # noqa: E402
from tfkdp.train import copy_model  # noqa: E402
from tfkdp.train import recipe as training  # noqa: E402
from tfkdp.train.batchnorm import recalibrate_batchnorm  # noqa: E402
from tfkdp.train.phases import Training  # noqa: E402

# family -> (zoo name, teacher kwargs, width argument of the narrower KD-only student, its candidates)
FAMILIES = {
    "resnet": ("resnet20", {"width": 16}, "width", [4, 6, 8, 10, 12, 14]),
    "densenet": ("densenet_bc_cifar", {"depth": 40, "growth_rate": 12}, "growth_rate",
                 [3, 4, 5, 6, 7, 8, 9, 10]),
    "efficientnet": ("efficientnet_cifar", {"alpha": 0.5, "depth_coefficient": 0.5}, "alpha",
                     [0.15, 0.2, 0.25, 0.3, 0.35, 0.4]),
    "mobilenet": ("mobilenet_v2_cifar", {"alpha": 0.5}, "alpha", [0.15, 0.2, 0.25, 0.3, 0.35, 0.4]),
}  # fmt: skip
METHODS = ("kd_only", "weight", "channel")
# Training batches over which batch-norm statistics are re-estimated: every student's and a new teacher's.
RECALIBRATE_BATCHES = 100


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.8],
                        help="non-zero parameter reductions (channel pruning's parameter budget)")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per method (all equal)")
    parser.add_argument("--train-subset", type=int, default=0, help="training images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--latency-repeat", type=int, default=200)
    parser.add_argument("--name", default="granularity", help="results file stem")
    parser.add_argument("--restart", action="store_true",
                        help="ignore the runs recorded under --name (default: resume them)")  # fmt: skip
    args = parser.parse_args()
    for level in args.levels:
        if not 0.0 < level < 1.0:
            parser.error(f"--levels must lie in (0, 1); received {level}")
    if args.epochs < 1 or args.teacher_epochs < 1:
        parser.error("--epochs and --teacher-epochs must be >= 1")
    return args


def _teacher(family, args):
    """The family's teacher: kept in `benchmarks/teachers/`, else trained on Fashion-MNIST once and cached."""
    name, kwargs, _, _ = FAMILIES[family]

    def train():
        keras.utils.set_random_seed(0)
        model = models.get(name, input_shape=(28, 28, 1), num_classes=10, **kwargs)
        train_data, test = common.datasets(args.batch_size, 0, args.train_subset or None)
        start = time.time()
        history = training.train_classifier(model, train_data, test, epochs=args.teacher_epochs,
                                            learning_rate=0.1, verbose=2)  # fmt: skip
        seconds = round(time.time() - start, 1)
        # The moving batch-norm statistics lag behind a short run's weights: re-estimate them
        # before the teacher is kept, as every student is. The as-trained accuracy is the last
        # epoch's validation on the test images.
        as_trained = float(history.history["val_accuracy"][-1])
        recalibrate_batchnorm(model, train_data, RECALIBRATE_BATCHES)
        return model, {"name": name, "kwargs": kwargs, "train_seconds": seconds,
                       "test_accuracy_as_trained": round(as_trained, 4),
                       "bn_reestimated_batches": RECALIBRATE_BATCHES}  # fmt: skip

    return common.kept_or_trained(f"granularity_{name}_e{args.teacher_epochs}_n{args.train_subset}", train)


def _measure(model, repeat, reference=None):
    """Accuracy, counts, artifact sizes, LiteRT p50 and PE (against `reference`, the teacher's)."""
    row = {
        "test_accuracy": common.test_accuracy(model),
        "params": metrics.count_params(model),
        "nonzero_params": metrics.count_nonzero_params(model),
        "macs": metrics.count_macs(model),
    }
    (_, _), (x_test, _) = common.load_fashion_mnist_arrays()
    x = data.preprocess(x_test[:256]).numpy()
    with tempfile.TemporaryDirectory() as folder:
        paths = export.export_model(model, folder, formats=("tflite", "tflite_sparse"))
        verified = export.verify(model, dict(paths), x)  # raises if an artifact differs
        rows = export.benchmark_latency(dict(paths), (28, 28, 1), threads=(1,), repeat=repeat)
        for fmt, path in paths.items():
            suffix = "" if fmt == "tflite" else "_sparse"
            row[f"file_bytes{suffix}"] = tree_size_bytes(path)
            row[f"gzip_bytes{suffix}"] = gzip_size_bytes(path)
            row[f"max_abs_diff{suffix}"] = verified[fmt]["max_abs_diff"]
        for r in rows:
            row["p50_ms" + ("" if r["format"] == "tflite" else "_sparse")] = r["p50_ms"]
    if reference is not None:
        for cost in ("nonzero_params", "macs", "file_bytes", "gzip_bytes", "file_bytes_sparse",
                     "gzip_bytes_sparse", "p50_ms", "p50_ms_sparse"):  # fmt: skip
            ref_cost = reference[cost.replace("_sparse", "")]
            row[f"pe_{cost}"] = metrics.performance_efficiency(
                row["test_accuracy"], reference["test_accuracy"], row[cost], ref_cost
            )
    return row


def _narrow(family, target_params):
    """The family's dense student whose parameter count is closest to `target_params`."""
    name, kwargs, arg, candidates = FAMILIES[family]
    best = None
    for value in candidates:
        model = models.get(name, input_shape=(28, 28, 1), num_classes=10, **dict(kwargs, **{arg: value}))
        gap = abs(metrics.count_params(model) - target_params)
        if best is None or gap < best[0]:
            best = (gap, value, model)
    return best[1], best[2]


def _training(args):
    return Training(learning_rate=args.learning_rate, recalibrate_bn=RECALIBRATE_BATCHES, verbose=2)


def _run_level(teacher, teacher_row, family, level, seed, args):
    """The three methods at one level: `{method: row}`."""
    train, _ = common.datasets(args.batch_size, seed, args.train_subset or None)
    results = {}
    epochs = args.epochs
    # channel+KD sets the level: kdp to a parameter budget.
    keras.utils.set_random_seed(seed)
    start = time.time()
    admm = max(1, epochs // 2)
    kdp = methods.get("kdp", admm_epochs=admm, finetune_epochs=max(0, epochs - admm),
                      round_to=1, training=_training(args))  # fmt: skip
    result = kdp.compress(teacher, copy_model(teacher), train, None, methods.Budget.params(level))
    row = _measure(result.model, args.latency_repeat, teacher_row)
    row.update(train_seconds=round(time.time() - start, 1), epochs=admm + kdp.finetune_epochs)
    results["channel"] = row
    target = row["nonzero_params"]

    # weight+KD at the same non-zero count: the sparsity of the prunable weights that leaves it.
    masked = unstructured.apply_weight_masks(teacher)
    prunable = unstructured.weight_sparsity(masked)["total"]
    sparsity = min(0.99, max(0.0, (teacher_row["nonzero_params"] - target) / prunable))
    keras.utils.set_random_seed(seed)
    start = time.time()
    prune = max(1, (epochs - 1) // 2)
    weight = methods.get(
        "weight", order="sequential", target_sparsity=sparsity, kd_epochs=1, prune_epochs=prune,
        finetune_epochs=max(0, epochs - 1 - prune), training=_training(args),
    )  # fmt: skip
    result = weight.compress(teacher, copy_model(teacher), train, None, None)
    row = _measure(result.model, args.latency_repeat, teacher_row)
    row.update(train_seconds=round(time.time() - start, 1), target_sparsity=sparsity,
               epochs=1 + prune + weight.finetune_epochs)  # fmt: skip
    results["weight"] = row

    # KD-only: a narrower dense student of about the same size.
    keras.utils.set_random_seed(seed)
    width, student = _narrow(family, target)
    start = time.time()
    kd = methods.get("kd_only", admm_epochs=epochs, finetune_epochs=0, training=_training(args))
    result = kd.compress(teacher, student, train, None, None)
    row = _measure(result.model, args.latency_repeat, teacher_row)
    row.update(train_seconds=round(time.time() - start, 1), width=width, epochs=epochs)
    results["kd_only"] = row
    return results


COLUMNS = ("family", "level", "method", "test_accuracy", "nonzero_params", "macs", "file_bytes",
           "gzip_bytes", "file_bytes_sparse", "p50_ms", "p50_ms_sparse", "pe_nonzero_params",
           "pe_macs", "pe_file_bytes", "pe_gzip_bytes", "pe_p50_ms")  # fmt: skip


def _table(runs):
    """Mean over seeds per (family, level, method), in the table's row order."""
    rows = []
    keys = sorted({(r["family"], r["level"]) for r in runs}, key=lambda k: (list(FAMILIES).index(k[0]), k[1]))
    for family, level in keys:
        for method in ("teacher", *METHODS):
            cells = [r for r in runs if (r["family"], r["level"], r["method"]) == (family, level, method)]
            if not cells:
                continue
            row = {"family": family, "level": level, "method": method, "seeds": len(cells)}
            for column in COLUMNS[3:]:
                values = [c[column] for c in cells if c.get(column) is not None]
                if values:
                    row[column] = statistics.fmean(values)
            rows.append(row)
    return rows


def _verdict(rows):
    """Whether weight+KD is ahead of channel+KD on accuracy, per (family, level)."""
    lines = []
    for row in rows:
        if row["method"] != "weight":
            continue
        channel = next((r for r in rows if (r["family"], r["level"], r["method"])
                        == (row["family"], row["level"], "channel")), None)  # fmt: skip
        if channel is None:
            continue
        delta = row["test_accuracy"] - channel["test_accuracy"]
        lines.append(
            f"- {row['family']} at {row['level']:.0%} fewer non-zero params: weight+KD "
            f"{'ahead of' if delta > 0 else 'behind'} channel+KD by {abs(delta) * 100:.2f} pt; "
            f"LiteRT p50 {row['p50_ms']:.3f} ms (dense kernels) vs {channel['p50_ms']:.3f} ms "
            f"(stripped), sparse file {row['file_bytes_sparse'] / 1024:.0f} KiB vs "
            f"{channel['file_bytes'] / 1024:.0f} KiB."
        )
    return lines


def _write(args, runs, wall):
    rows = _table(runs)
    payload = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.granularity",
                             *sys.argv[1:]]),  # fmt: skip
        "cpu": common.cpu_name(), "cpu_cores": os.cpu_count(),
        "wall_seconds": round(time.time() - wall, 1), "args": vars(args),
        "table": rows, "runs": runs,
    }  # fmt: skip
    common.write_json(os.path.join(common.RESULTS_DIR, args.name + ".json"), payload)
    text = "\n".join([
        "# Weight vs channel pruning under KD (Fashion-MNIST)", "",
        f"`{payload['command']}` on {payload['cpu']} ({payload['cpu_cores']} cores), "
        f"{payload['wall_seconds']:.0f} s. Means over seeds; PE: teacher = 1.", "",
        common.markdown_table(rows, ("seeds", *COLUMNS)), "",
        *_verdict(rows), "",
    ])  # fmt: skip
    common.write_text(os.path.join(common.RESULTS_DIR, args.name + ".md"), text)
    print(common.markdown_table(rows, COLUMNS), flush=True)


# Options a recorded run must share to be resumed (families, levels and seeds may grow).
RESUME_KEYS = ("teacher_epochs", "epochs", "train_subset", "batch_size", "learning_rate")


def _previous_runs(args):
    """The runs recorded under `--name` by the same setup (`RESUME_KEYS`), else `[]`."""
    import json

    path = os.path.join(common.RESULTS_DIR, args.name + ".json")
    if args.restart or not os.path.exists(path):
        return []
    with open(path) as f:
        payload = json.load(f)
    if any(payload["args"].get(k) != getattr(args, k) for k in RESUME_KEYS):
        print(f"{path} holds another setup: starting over", flush=True)
        return []
    return payload["runs"]


def _cell(run):
    return run["family"], run["level"], run["seed"]


def main():
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    args = _parse()
    wall = time.time()
    runs = _previous_runs(args)
    for family in args.families:
        teacher, info = _teacher(family, args)
        teacher_row = _measure(teacher, args.latency_repeat)
        # None for the teachers kept before their batch norms were re-estimated (resnet, mobilenet).
        teacher_row["test_accuracy_as_trained"] = info.get("test_accuracy_as_trained")
        accuracy = teacher_row["test_accuracy"]
        # Another teacher (retrained elsewhere): its rows do not compare with this one's. The same
        # file on another CPU may flip a near-tie or two of the 10 000 test images: 0.2 % slack.
        stale = [r for r in runs if r["family"] == family
                 and abs(r.get("teacher_test_accuracy", -1.0) - accuracy) > 0.002]  # fmt: skip
        if stale:
            print(f"dropping {len(stale)} recorded {family} rows of another teacher", flush=True)
            runs = [r for r in runs if r not in stale]
        for level in args.levels:
            if not any((r["family"], r["level"], r["method"]) == (family, level, "teacher") for r in runs):
                runs.append(dict(teacher_row, family=family, level=level, method="teacher", seed=None,
                                 teacher_test_accuracy=accuracy))  # fmt: skip
            for seed in args.seeds:
                cell = (family, level, seed)
                if set(METHODS) <= {r["method"] for r in runs if _cell(r) == cell}:
                    print(f"{family} at {level} seed {seed}: recorded, skipped", flush=True)
                    continue
                runs = [r for r in runs if _cell(r) != cell]  # a partial record is run again
                for method, row in _run_level(teacher, teacher_row, family, level, seed, args).items():
                    runs.append(dict(row, family=family, level=level, method=method, seed=seed,
                                     teacher_test_accuracy=accuracy))  # fmt: skip
                _write(args, runs, wall)
                keras.backend.clear_session()
    _write(args, runs, wall)


if __name__ == "__main__":
    main()

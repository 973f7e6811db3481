"""Export benchmark: size, parity and p50 latency of every format × runtime.

Models: resnet20 (width 16, 28×28×1) trained on real Fashion-MNIST (cached by
`benchmarks.common.get_teacher`), and the same network stripped to 50 % of its
MACs (`tfkdp.pruner.make_plan(target_macs_reduction=0.5, criterion="l1",
allocation="uniform")` + `tfkdp.surgery.strip_channels`) then fine-tuned.
Each is exported to all formats (int8 calibrated on real training images),
verified against Keras on real test images, and timed on its runtime at batch
size 1 with 1 and 2 threads.

Run (from the repository root, once, with nothing else benchmarking):

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.export

Writes benchmarks/results/export.json and benchmarks/results/export.md.
"""

import argparse
import json
import os
import sys
import tempfile
import time

if not __package__:
    # Run as a script, benchmarks/ would come first on sys.path and this file
    # would shadow the `export` package: put the repository root there instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import (  # noqa: E402
    data,
    export,
    metrics,
    onednn,
)
from tfkdp.export.latency import runtime_versions, summarize, time_calls  # noqa: E402
from tfkdp.train import recipe as training  # noqa: E402


def _stripped_resnet20(base, train, test, finetune_epochs, seed, round_to):
    """resnet20 stripped to 50 % of its MACs and fine-tuned; cached in benchmarks/.cache."""
    from tfkdp.pruning import make_plan, strip_channels

    how = (
        "tfkdp.pruner.make_plan(target_macs_reduction=0.5, criterion='l1', allocation='uniform', "
        f"round_to={round_to}) + tfkdp.surgery.strip_channels of the trained resnet20, "
        f"fine-tuned {finetune_epochs} epoch(s) at lr 0.05"
    )
    stem = f"export_resnet20_half_macs_r{round_to}_ft{finetune_epochs}_s{seed}"
    path = os.path.join(common.CACHE_DIR, stem + ".keras")
    if os.path.exists(path) and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            return keras.saving.load_model(path), how, json.load(f)["finetune_seconds"]
    plan = make_plan(
        base, target_macs_reduction=0.5, criterion="l1", allocation="uniform", round_to=round_to
    )
    small = strip_channels(base, plan)
    keras.utils.set_random_seed(seed)
    start = time.time()
    training.train_classifier(small, train, test, epochs=finetune_epochs, learning_rate=0.05,
                              verbose=2)  # fmt: skip
    seconds = round(time.time() - start, 1)
    os.makedirs(common.CACHE_DIR, exist_ok=True)
    tmp = os.path.join(common.CACHE_DIR, f".{stem}.tmp.keras")
    small.save(tmp)
    os.replace(tmp, path)
    common.write_json(path + ".json", {"finetune_seconds": seconds, "plan": plan.to_json()})
    return small, how, seconds


def _conv_widths(model):
    return [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def _export_and_verify(name, model, out_dir, calibration, x, y):
    start = time.time()
    paths = export.export_model(model, out_dir, calibration=calibration)
    export_s = time.time() - start
    try:
        verification, verified, failures = export.verify(model, dict(paths), x, y), True, []
    except export.VerificationError as error:
        verification, verified, failures = error.results, False, error.failures
        print(f"VERIFICATION FAILED for {name}:\n  " + "\n  ".join(failures), flush=True)
    return paths, {
        "export_seconds": round(export_s, 1),
        "verified": verified,
        "verification_failures": failures,
        "verification": {
            f: {k: v for k, v in r.items() if k != "path"} for f, r in verification.items()
        },
    }


def _interleaved_latency(all_paths, input_shape, threads, warmup, repeat, rounds, seed):
    """LiteRT/onnxruntime latency, every cell timed in `rounds` interleaved slices.

    The machine is shared: load from other processes comes and goes. Timing
    each (model, format, threads) cell in one block would charge a burst of
    load to whichever cell ran then; slicing every cell's `repeat` calls into
    `rounds` slices visited in a shuffled order per round spreads it evenly,
    so cells compare fairly. Same runners and timer as
    `export.benchmark_latency` (`export.open_runner`, `time_calls`).
    """
    x = np.random.default_rng(seed).uniform(0, 1, (1, *input_shape)).astype(np.float32)
    cells = {}
    for name, paths in all_paths.items():
        for fmt, path in paths.items():
            if export.RUNTIMES[fmt] == "tensorflow":
                continue
            for n in threads:
                runner = export.open_runner(fmt, path, num_threads=n)
                feed = runner.prepare(x)
                time_calls(runner.run, feed, warmup, 0)
                cells[(name, fmt, n)] = (runner, feed, path, [])
    order = list(cells)
    rng = np.random.default_rng(seed)
    per_round = max(1, repeat // rounds)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            runner, feed, _, times = cells[key]
            times.append(time_calls(runner.run, feed, 2, per_round))
    rows = []
    for (name, fmt, n), (runner, _, path, times) in cells.items():
        rows.append({
            "model": name, "format": fmt, "runtime": runner.runtime, "threads": n,
            "batch_size": 1, **summarize(np.concatenate(times)),
            "size_bytes": int(os.path.getsize(path)), "repeat": per_round * rounds,
            "rounds": rounds,
        })  # fmt: skip
    return rows


def _markdown(result):
    threads = result["settings"]["threads"]
    lines = [
        "# Export benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"CPU: {result['cpu']} ({result['cpu_count']} cores visible), load average "
        f"{result['load_average_before'][0]:.2f} before / {result['load_average_after'][0]:.2f} "
        "after (1 min; the machine is shared).  ",
        f"Batch size 1; p50 in ms per inference (input feed + run + output fetch). LiteRT and "
        f"onnxruntime: {result['settings']['warmup']} warm-up + {result['settings']['repeat']} "
        f"timed inferences per cell, in {result['settings']['rounds']} slices interleaved across "
        "all cells (so load from other processes spreads evenly); TF: "
        f"{result['settings']['tf_repeat']} timed calls in a fresh process per thread count. "
        f"Verification on the first {result['settings']['verify_samples']} Fashion-MNIST test "
        f"images; int8 calibrated on {result['settings']['calibration_samples']} training images.",
        "",
    ]
    for name, info in result["models"].items():
        lines.append(
            f"- **{name}**: {info['macs'] / 1e6:.2f} M MACs, {info['params'] / 1e3:.1f} k params, "
            f"Keras accuracy {info['keras_accuracy']:.4f} (first "
            f"{result['settings']['verify_samples']} test images); conv widths "
            f"{sorted(set(info['conv_widths']))}; {info['how']}"
        )
    lines += ["", "| model | format | runtime | size KiB | accuracy | top-1 agree | max rel diff | "
              + " | ".join(f"p50 ms t={t}" for t in threads) + " |",
              "|" + "---|" * (7 + len(threads))]  # fmt: skip
    for name in result["models"]:
        for fmt in export.FORMATS:
            cells = [r for r in result["latency"] if r["model"] == name and r["format"] == fmt]
            if not cells:
                continue
            first = cells[0]
            p50 = {r["threads"]: r["p50_ms"] for r in cells}
            lines.append(
                f"| {name} | {fmt} | {first['runtime']} | {first['size_bytes'] / 1024:.1f} | "
                f"{first['accuracy']:.4f} | {first['top1_agreement']:.4f} | "
                f"{first['max_abs_diff_rel']:.1e} | "
                + " | ".join(f"{p50[t]:.3f}" for t in threads) + " |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=1000, help="timed calls per LiteRT/ORT cell")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved slices per cell")
    parser.add_argument("--tf_repeat", type=int, default=200, help="timed calls per TF cell")
    parser.add_argument("--teacher_epochs", type=int, default=1)
    parser.add_argument("--finetune_epochs", type=int, default=1)
    parser.add_argument("--calibration_samples", type=int, default=500)
    parser.add_argument("--verify_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.threads = tuple(int(t) for t in args.threads.split(","))

    started = time.time()
    load_before = os.getloadavg()
    (x_train, _), (x_test, y_test) = common.load_fashion_mnist_arrays()
    order = np.random.default_rng(args.seed).permutation(len(x_train))[: args.calibration_samples]
    calibration = np.asarray(data.preprocess(x_train[order]))
    x = np.asarray(data.preprocess(x_test[: args.verify_samples]))
    y = np.asarray(y_test[: args.verify_samples]).astype(np.int64)

    base, teacher_info = common.get_teacher("resnet20", epochs=args.teacher_epochs, seed=args.seed)
    train, test = common.datasets(seed=args.seed)
    candidates = {
        "resnet20": (base, f"trained {args.teacher_epochs} epoch(s) (benchmarks.common.get_teacher)",
                     None),
    }  # fmt: skip
    # round_to=1 keeps ~70 % of every group (odd widths such as 11, 22, 45);
    # round_to=8 keeps multiples of 8, which SIMD kernels do not pad.
    for round_to in (1, 8):
        small, how, seconds = _stripped_resnet20(
            base, train, test, args.finetune_epochs, args.seed, round_to
        )
        candidates[f"resnet20-50%MACs-r{round_to}"] = (small, how, seconds)
    result = {
        "command": "flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.export "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": common.cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": runtime_versions(),
        "settings": {
            "threads": list(args.threads), "warmup": args.warmup, "repeat": args.repeat,
            "rounds": args.rounds, "tf_repeat": args.tf_repeat,
            "batch_size": 1, "calibration_samples": args.calibration_samples,
            "verify_samples": args.verify_samples, "seed": args.seed,
            "teacher_epochs": args.teacher_epochs, "finetune_epochs": args.finetune_epochs,
        },  # fmt: skip
        "models": {},
        "verification": {},
        "latency": [],
        "load_average_before": list(load_before),
    }
    with tempfile.TemporaryDirectory(prefix="tfkdp-export-bench-") as tmp:
        all_paths = {}
        for name, (model, note, finetune_s) in candidates.items():
            print(f"== {name}: exporting and verifying", flush=True)
            paths, info = _export_and_verify(
                name, model, os.path.join(tmp, name), calibration, x, y
            )
            all_paths[name] = paths
            result["models"][name] = {
                "how": note,
                "macs": metrics.count_macs(model),
                "params": metrics.count_params(model),
                "macs_ratio": metrics.count_macs(model) / metrics.count_macs(base),
                "conv_widths": _conv_widths(model),
                "keras_accuracy": metrics.accuracy(model, x, y),
                "finetune_seconds": finetune_s,
                "export_seconds": info["export_seconds"],
                "verified": info["verified"],
                "verification_failures": info["verification_failures"],
            }
            result["verification"][name] = info["verification"]
        print("== timing LiteRT and onnxruntime (interleaved)", flush=True)
        shape = tuple(base.input_shape[1:])
        rows = _interleaved_latency(
            all_paths, shape, args.threads, args.warmup, args.repeat, args.rounds, args.seed
        )
        print("== timing TF SavedModels (one subprocess per thread count)", flush=True)
        for name, paths in all_paths.items():
            for row in export.benchmark_latency(
                {"saved_model": paths["saved_model"]}, shape, threads=args.threads,
                warmup=args.warmup, repeat=args.tf_repeat,
            ):  # fmt: skip
                row.pop("path")
                rows.append({"model": name, **row, "rounds": 1})
        for row in rows:
            check = result["verification"][row["model"]].get(row["format"], {})
            row["accuracy"] = check.get("accuracy")
            row["top1_agreement"] = check.get("top1_agreement")
            row["max_abs_diff_rel"] = check.get("max_abs_diff_rel")
        result["latency"] = rows
    result["models"]["resnet20"]["teacher_info"] = teacher_info
    result["load_average_after"] = list(os.getloadavg())
    result["wall_seconds"] = round(time.time() - started, 1)

    common.write_json(os.path.join(common.RESULTS_DIR, "export.json"), result)
    markdown = _markdown(result)
    common.write_text(os.path.join(common.RESULTS_DIR, "export.md"), markdown)
    print(markdown)
    return 0 if all(m["verified"] for m in result["models"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

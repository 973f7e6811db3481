"""The recipes table: every registered method under the KDP table's protocol.

One protocol for every recipe, so one table compares them all:

- teacher: resnet32 (width 16) trained 10 epochs on all 60 k Fashion-MNIST
  training images (`benchmarks.common.get_teacher`: the file kept in
  `benchmarks/teachers/`). The KDP table's rows (`benchmarks.kdp
  --teacher-epochs 10`) distilled from a teacher of the same recipe trained on
  another machine (93.27 % instead of 93.47 %), so every row records its
  teacher's test accuracy (the table's `teacher acc` column);
- budget: 51 % MAC reduction (`make_plan` lands within 2 % of it; the KDP
  table's target); `weight`, which removes no channels, sets that share of
  its prunable weights to zero instead (the `non-zero` column), and `kd_only`
  distils the dense resnet32 whose width gives the MACs closest to the budget
  (the KDP table's baseline, `kd_only_student`);
- the same total number of epochs for every method (4 by default: e.g. kdp's
  2 ADMM + 2 fine-tune; a method's own phases share those 4);
- all 60 k training images (augmented), batch 128, peak LR 0.05;
- `ddsl`, which meta-learns on a validation split, gets the last 5 000
  training images, un-augmented, as `val_data`: a split that is *also
  trained on* (the protocol trains every method on all 60 k), never the test
  set; `mskd` carves its own held-out batches from the training stream (see
  `tfkdp.methods.mskd`); the other methods get no validation data;
- ≥ 2 seeds; test accuracy on the 10 k test images after each method's own
  batch-norm re-estimation.

Results are merged into `benchmarks/results/recipes.json` (a method/seed
re-run replaces its entry) and written after every run, so a long run stopped
early keeps what finished; `recipes.md` holds the table with the KDP table's
rows (`kdp_t10.json`) for the methods this script has not re-run.

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.recipes --methods pdc mskd

Writes benchmarks/results/recipes.json and recipes.md.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import data, methods, metrics, models, onednn  # noqa: E402
from tfkdp.train.phases import Training  # noqa: E402

RESULTS = os.path.join(common.RESULTS_DIR, "recipes.json")
TABLE = os.path.join(common.RESULTS_DIR, "recipes.md")
KDP_TABLE = os.path.join(common.RESULTS_DIR, "kdp_t10.json")
VAL_IMAGES = 5000
NEEDS_VALIDATION = ("ddsl", "cascade")  # mskd carves its own held-out batches from the training data


# Single MS-KD candidates trained to the end, for the Kendall τ between its selection rungs and
# the final accuracy (`benchmarks.mskd --from-recipes`): mskd's seed-0 winner (hessian/uniform),
# another of its top 3 (taylor/global) and one it ranked below them.
MSKD_CANDIDATES = {
    f"mskd_{c}" + ("" if a == "global" else f"_{a}"): (
        "mskd", {"criteria": [c], "allocations": [a], "top_k": 1})
    for c, a in (("hessian", "uniform"), ("taylor", "global"), ("l2", "uniform"))
}  # fmt: skip
# Cascade with 0, 1 and 2 teaching assistants: {row name: number of TAs}.
CASCADE_ROWS = {f"cascade_ta{k}": k for k in (0, 1, 2)}
# Rows that are a registered method with other options: {row name: (method, options)}.
VARIANTS = {
    # MS-KD's baseline: KD of the plain L1 candidate, same step budget, no selection.
    "mskd_l1": ("mskd", {"criteria": ["l1"], "allocations": ["global"], "top_k": 1}),
    **MSKD_CANDIDATES,
    # KDP with its penalty before issue 18: per-group normalisation, ρ 0.001 → 0.05 (ddsl's).
    "kdp_group": ("kdp", {"normalize": True, "rho_initial": 1e-3, "rho_final": 0.05}),
    # PDC with C-SGD's constant ε = 3e-3 instead of epsilon="auto" (sized to the phase).
    "pdc_eps0.003": ("pdc", {"epsilon": 3e-3}),
    # PDC with epsilon="auto" but C-SGD's weaker batch-norm pull (the default before session 7's fix).
    "pdc_auto_bn0.1": ("pdc", {"bn_factor": 0.1}),
    **{row: ("cascade", {"num_tas": k}) for row, k in CASCADE_ROWS.items()},
}
# Rows that diagnose a setting that is no longer a default, or that measure MS-KD's selection
# (single candidates other than the baseline mskd_l1): in the table, not in the plot (a 75 %
# diagnosis would squash the comparison of the rows near 93 %).
DIAGNOSES = ("pdc_eps0.003", "pdc_auto_bn0.1", "kdp_group", *MSKD_CANDIDATES)
# Methods that train all epochs in their first phase (no separate fine-tune phase).
ONE_PHASE = ("pdc", "mskd")


DEFAULT_TARGET = 0.51


def row_key(row, target):
    """The results key of a row: its name, with `@target` when the target is not the default."""
    return row if target == DEFAULT_TARGET else f"{row}@{target:g}"


def method_of(row):
    """`(registered method name, extra options)` of a table row name."""
    return VARIANTS.get(row, (row, {}))


def method_options(row, epochs, learning_rate, target=DEFAULT_TARGET):
    """The options of the row `row` under the protocol (`epochs` in total, `target` the reduction).

    `weight` takes no MAC budget: its row sets the share `target` of the prunable weights to
    zero (about the non-zero parameter count of the narrow kd_only student), with the
    pipeline's epoch split (`--compress_epochs` = half the epochs: 1 KD, 1 pruning with KD;
    the rest a KD fine-tune).
    """
    name, extra = method_of(row)
    training = Training(learning_rate=learning_rate, verbose=2)
    first = epochs if name in ONE_PHASE else epochs // 2
    if name == "weight":
        flags = {"compress_epochs": first, "finetune_epochs": epochs - first,
                 "weight_order": "sequential", "target_sparsity": target}  # fmt: skip
        return {**methods.get_class(name).pipeline_options(flags, training), **extra}
    options = {"admm_epochs": first, "finetune_epochs": epochs - first, "training": training}
    if name == "ddsl":
        options["dean_every"] = 10
    if name == "cascade":  # stage 1 gets all epochs but the last, stage 2 (the fine-tune) one
        options.update(admm_epochs=epochs - 1, finetune_epochs=0, stage2_epochs=1)
    return {**options, **extra}


def kd_only_student(teacher_macs, target):
    """kd_only's dense student (the KDP table's): the resnet32 whose width gives the MACs
    closest to the budget's, `(1 - target) * teacher_macs`."""
    width, _ = common.narrow_resnet(32, (1.0 - target) * teacher_macs, 16)
    return models.resnet_cifar(32, width=width)


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=[],
                        help=f"registered methods ({methods.names()}) or {list(VARIANTS)}")  # fmt: skip
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET,
                        help="MAC reduction target (rows at another target are keyed row@target)")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4, help="total epochs per method")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--train-subset", type=int, default=0, help="training images (0 = all)")
    parser.add_argument("--table-only", action="store_true",
                        help="rewrite recipes.md and the plot from recipes.json; train nothing")  # fmt: skip
    args = parser.parse_args()
    if not args.methods and not args.table_only:
        parser.error("--methods is required (or --table-only)")
    for row in args.methods:
        methods.get_class(method_of(row)[0])  # an unknown name fails now, listing the valid ones
    return args


def _validation(batch_size, train_subset):
    (x_train, y_train), _ = common.load_fashion_mnist_arrays()
    if train_subset:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    count = min(VAL_IMAGES, len(x_train) // 10)
    return data.make_dataset(x_train[-count:], y_train[-count:], batch_size)


def _jsonable(value):
    """The parts of a method's record that are plain JSON (long lists shortened)."""
    try:
        json.dumps(value)
    except TypeError:
        return str(value)
    if isinstance(value, list) and len(value) > 50:
        return value[:: max(1, len(value) // 50)]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def run_one(row, teacher, args, seed, teacher_accuracy):
    """Compresses a copy of `teacher` as the row `row` says; returns the row's numbers.

    `teacher_accuracy` (the teacher's test accuracy, a fraction) is stored with the
    row: it tells apart teachers of the same recipe trained on different machines.
    """
    keras.utils.set_random_seed(seed)
    name = method_of(row)[0]
    train, _ = common.datasets(args.batch_size, seed, args.train_subset or None)
    val = _validation(args.batch_size, args.train_subset) if name in NEEDS_VALIDATION else None
    options = method_options(row, args.epochs, args.learning_rate, args.target)
    method = methods.get(name, **options)
    budget = methods.Budget.macs(args.target) if method.prunes else None
    teacher_macs = metrics.count_macs(teacher)
    student = kd_only_student(teacher_macs, args.target) if name == "kd_only" else None
    start = time.time()
    result = method.compress(teacher, student, train, val, budget)
    seconds = time.time() - start
    row = {
        "test_accuracy": common.test_accuracy(result.model),
        "macs": metrics.count_macs(result.model),
        "params": metrics.count_params(result.model),
        "nonzero_params": int(sum(np.count_nonzero(w) for w in result.model.get_weights())),
        "train_seconds": round(seconds, 1),
        "teacher_test_accuracy": teacher_accuracy,
        "method": name,
        "options": {k: v for k, v in method.get_config().items() if k != "training"},
        "record": _jsonable({k: v for k, v in result.record.items() if k != "channels"}),
        "onednn_active": onednn.onednn_active(),
    }
    row["macs_reduction"] = 1.0 - row["macs"] / teacher_macs
    keras.backend.clear_session()
    return row


def _load(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def summarise(results):
    """`{method: mean/per-seed summary}` of the stored runs.

    Size (MACs, parameters, MAC reduction) is the mean over the seeds too: a method whose masks
    move during training (cascade) can end a few channels apart from one seed to the next.
    """
    summary = {}
    for name, runs in results.get("runs", {}).items():
        seeds = sorted(runs, key=int)
        accs = [runs[s]["test_accuracy"] for s in seeds]
        summary[name] = {
            "test_accuracy_mean": statistics.fmean(accs),
            "test_accuracy_per_seed": accs,
            "seeds": [int(s) for s in seeds],
            "train_seconds_mean": round(statistics.fmean(runs[s]["train_seconds"] for s in seeds), 1),
            "teacher_test_accuracy": sorted({runs[s]["teacher_test_accuracy"] for s in seeds}),
            **{k: statistics.fmean(runs[s][k] for s in seeds)
               for k in ("macs", "params", "nonzero_params", "macs_reduction")},
        }
    return summary


def table(results):
    """The Markdown table: this script's rows, then the KDP table's rows not re-run here."""
    summary = summarise(results)
    kdp_table = _load(KDP_TABLE)
    rows = []
    teacher = results.get("teacher") or kdp_table.get("teacher")
    if teacher:
        rows.append({
            "method": "teacher (resnet32)", "test acc (mean)": round(100 * teacher["test_accuracy"], 2),
            "per seed": "-", "MACs (M)": round(teacher["macs"] / 1e6, 2), "MAC reduction": 0.0,
            "params (k)": round(teacher["params"] / 1e3, 1),
            "non-zero (k)": round(teacher["params"] / 1e3, 1), "train s (mean)": "-", "source": "-",
            "teacher acc": "-",
        })  # fmt: skip
    earlier = [(n, {**kdp_table[n], "teacher_test_accuracy": [kdp_table["teacher"]["test_accuracy"]]},
                "kdp_t10.json") for n in ("prune_only", "kd_only", "kdp")
               if n in kdp_table and n not in summary]  # fmt: skip
    for name, r, source in earlier + [(n, r, "recipes.json") for n, r in summary.items()]:
        rows.append({
            "method": name, "test acc (mean)": round(100 * r["test_accuracy_mean"], 2),
            "per seed": " / ".join(f"{100 * a:.2f}" for a in r["test_accuracy_per_seed"]),
            "MACs (M)": round(r["macs"] / 1e6, 2), "MAC reduction": round(r["macs_reduction"], 3),
            "params (k)": round(r["params"] / 1e3, 1),
            "non-zero (k)": round(r.get("nonzero_params", r["params"]) / 1e3, 1),
            "train s (mean)": r["train_seconds_mean"],
            "source": source,
            "teacher acc": " / ".join(f"{100 * a:.2f}" for a in r["teacher_test_accuracy"]),
        })  # fmt: skip
    return common.markdown_table(rows, list(rows[0])) if rows else ""


def _split_key(key):
    """`(row, target)` of a results key (`row_key`'s inverse)."""
    row, _, target = key.partition("@")
    return row, float(target) if target else DEFAULT_TARGET


def cascade_table(results):
    """Cascade's chain, per run, and what its teaching assistants buy at each target.

    The first table has one line per cascade run (any target): test accuracy, MACs, the
    stage-1 step time and its ratio to a stage-2 step, every model's validation accuracy
    after stage 1 (batch norm re-estimated), the overlap of consecutive masks at the end of
    stage 1, and the stage-2 teacher swaps. The second has one line per target: the mean test
    accuracy of cascade with 0, 1 and 2 TAs and of kdp at that target, and the gain of each
    TA count over none (the paper's claim: TAs help more at the higher ratio). Returns ""
    when no cascade row was run.
    """
    runs = results.get("runs", {})
    keys = sorted((k for k in runs if method_of(_split_key(k)[0])[0] == "cascade"),
                  key=lambda k: (_split_key(k)[1], k))  # fmt: skip
    if not keys:
        return ""
    lines = []
    for key in keys:
        for seed in sorted(runs[key], key=int):
            run, record = runs[key][seed], runs[key][seed]["record"]
            models = record.get("models", [])
            overlap = (record.get("mask_overlap") or [[]])[-1]
            lines.append({
                "row": key, "seed": int(seed), "test acc %": f"{100 * run['test_accuracy']:.2f}",
                "MACs (M)": f"{run['macs'] / 1e6:.2f}",
                "stage-1 s/step": f"{record.get('stage1_seconds_per_step') or 0.0:.2f}",
                "step ratio": f"{record.get('step_time_ratio') or 0.0:.2f}",
                "val acc after stage 1 (student → top)": " / ".join(
                    f"{100 * m.get('val_accuracy_recalibrated', m['val_accuracy']):.2f}"
                    for m in models),
                "mask overlap": " / ".join(f"{o:.3f}" for o in overlap) or "-",
                "swaps": len(record.get("swaps") or []), "train s": run["train_seconds"],
            })  # fmt: skip
    text = common.markdown_table(lines, list(lines[0]))
    summary = summarise(results)
    gains = []
    none, *with_tas = CASCADE_ROWS
    for target in sorted({_split_key(k)[1] for k in keys}):
        line, mean = {"target": target}, {}
        for row in (*CASCADE_ROWS, "kdp"):
            entry = summary.get(row_key(row, target))
            if entry:
                mean[row] = 100 * entry["test_accuracy_mean"]
            line[row] = f"{mean[row]:.2f} ({len(entry['seeds'])})" if entry else "-"
        for row in with_tas:
            both = row in mean and none in mean
            line[f"{row[-3:]} − ta0"] = f"{mean[row] - mean[none]:+.2f}" if both else "-"
        gains.append(line)
    text += ("\n\nMean test accuracy % (seeds) per target, and what the TAs add over none:\n\n"
             + common.markdown_table(gains, list(gains[0])))  # fmt: skip
    return text


def pareto(results):
    """`recipes_pareto.png`: test accuracy vs MACs of every row but `DIAGNOSES` (error bars: seeds)."""
    from tfkdp.pipelines import comparison

    summary, kdp_table = summarise(results), _load(KDP_TABLE)
    merged = {n: kdp_table[n] for n in ("prune_only", "kd_only", "kdp")
              if n in kdp_table and n not in summary}  # fmt: skip
    merged.update(summary)
    rows = []
    for name, r in merged.items():
        if name in DIAGNOSES:
            continue
        accs = r["test_accuracy_per_seed"]
        rows.append({
            "method": name, "status": "ok", "runs_ok": len(accs), "macs": r["macs"],
            "test_accuracy": statistics.fmean(accs),
            "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        })  # fmt: skip
    teacher = results.get("teacher") or kdp_table.get("teacher") or {}
    plot = {"rows": rows, "best": None,
            "teacher": {"accuracy": teacher.get("test_accuracy"), "macs": teacher.get("macs")}}  # fmt: skip
    comparison.pareto_plot(plot, "macs", "MACs (millions, batch 1)",
                           "recipes on the KDP protocol (error bars: seeds)",
                           os.path.join(common.RESULTS_DIR, "recipes_pareto.png"),
                           teacher.get("macs"), 1e-6)  # fmt: skip


def main():
    args = _parse()
    if args.table_only:
        print(write_outputs(_load(RESULTS)), flush=True)
        return
    # As tfkdp's own entry points do: with oneDNN's custom ops on (AVX-512 CPUs) the default
    # onednn_guard="auto" keeps every group feeding a strided 1x1 convolution at 16 channels, so
    # the same row would get a different student on some machines. TFKDP_ONEDNN=1 keeps oneDNN on.
    onednn.disable_for_entry_point()
    command = " ".join(["flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.recipes",
                        *sys.argv[1:]])  # fmt: skip
    keras.utils.set_random_seed(args.seeds[0])
    teacher, info = common.get_teacher(epochs=args.teacher_epochs)
    teacher_accuracy = common.test_accuracy(teacher)
    results = _load(RESULTS)
    results.setdefault("runs", {})
    results["teacher"] = {
        "test_accuracy": teacher_accuracy, "macs": metrics.count_macs(teacher),
        "params": metrics.count_params(teacher), "epochs": info["epochs"],
    }  # fmt: skip
    results["setup"] = {
        "target_macs_reduction": args.target, "epochs_per_method": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "train_images": args.train_subset or 60000,
        "validation": f"last {VAL_IMAGES} training images, un-augmented (also trained on), "
                      f"for {list(NEEDS_VALIDATION)}",
        "cpu": common.cpu_name(), "cpu_cores": os.cpu_count(),
    }  # fmt: skip
    results.setdefault("commands", [])
    if command not in results["commands"]:
        results["commands"].append(command)
    for seed in args.seeds:
        for name in args.methods:
            row = run_one(name, teacher, args, seed, teacher_accuracy)
            print(f"seed {seed} ({name}): acc {row['test_accuracy']:.4f}, MAC reduction "
                  f"{row['macs_reduction']:.3f}, {row['train_seconds']:.0f} s", flush=True)  # fmt: skip
            # Merge into the file as it is now: another run may have written rows meanwhile.
            fresh = _load(RESULTS)
            fresh.setdefault("runs", {})
            for key in ("teacher", "setup"):
                fresh[key] = results[key]
            fresh["commands"] = list(dict.fromkeys([*fresh.get("commands", []), *results["commands"]]))
            results = fresh
            results["runs"].setdefault(row_key(name, args.target), {})[str(seed)] = row
            results["summary"] = summarise(results)
            common.write_json(RESULTS, results)
            print(write_outputs(results), flush=True)


def write_outputs(results):
    """Writes `recipes.md` and `recipes_pareto.png` from `results`; returns the Markdown."""
    setup = results["setup"]
    text = (
        "## Recipes on the KDP protocol (resnet32 teacher, Fashion-MNIST)\n\n"
        f"Commands: {'; '.join(f'`{c}`' for c in results['commands'])}. "
        f"{setup['train_images']} training images, {setup['epochs_per_method']} epochs per "
        f"method, batch {setup['batch_size']}, peak LR {setup['learning_rate']}, target MAC "
        f"reduction {DEFAULT_TARGET} (rows `name@t`: target t); validation: {setup['validation']}. CPU: {setup['cpu']}. `teacher acc`: the test accuracy of the "
        "teacher a row distilled from (the same recipe, trained on different machines).\n\n"
        f"{table(results)}\n"
    )
    chain = cascade_table(results)
    if chain:
        text += f"\n### Cascade's chain (every cascade run)\n\n{chain}\n"
    common.write_text(TABLE, text)
    pareto(results)
    return text


if __name__ == "__main__":
    main()

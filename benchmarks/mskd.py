"""MS-KD benchmark on real Fashion-MNIST: does model selection predict the final accuracy?

The question that decides whether MS-KD's selection is worth its cost: for
candidates trained to the end, the rank correlation (Kendall τ) between each
selection rung's score and the final test accuracy.

Protocol (the KDP table's): teacher resnet32 (cached by
`benchmarks.common.get_teacher`), a MAC reduction of `--target`, the student
a copy of the teacher, all 60k training images, the same total epochs for
every candidate (the selection's short-KD steps included).

1. **selection**: one `MSKD.select` over every candidate (criteria ×
   allocations) with `top_k` = all of them, so that both rungs score every
   candidate: zero-shot (adaptive BN, validation split carved from one pass
   of the training data) and short KD (`--select-steps`);
2. **training to the end**: each distinct candidate alone, as a one-candidate
   `mskd` (`top_k=1`): its short KD, then KD for the rest of
   `--epochs × steps per epoch`, BN re-estimation, strip; test accuracy on
   the 10k test set;
3. Kendall τ (scipy.stats.kendalltau) between each rung's validation
   accuracy (and negative KD loss) and the final test accuracy; which
   candidate `mskd`'s default rule (`--top-k` best zero-shot, then best
   short-KD) would have picked, and its regret against the best.

Results are written after every candidate (atomic), so a long run stopped
early keeps what it finished, and the same command run again resumes: it
reuses the recorded selection and trains only the candidates without a
test accuracy (`--restart` starts over):

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.mskd

`--from-recipes` trains nothing: it reads the single-candidate `mskd` rows of
`benchmarks.recipes` (`mskd_l1`, `mskd_hessian_uniform`, ...: `top_k=1`, one
criterion and one allocation, at the recipes' protocol target 0.51) of one
`--seed`, each holding its own zero-shot and short-KD scores and its final test
accuracy, and reports the same τ over them, with the full `mskd` row's
selection of that seed (which candidate it picked) beside them:

    .venv/bin/python -m benchmarks.mskd --from-recipes --seed 0

Smoke check (a few minutes; a tiny teacher, not the protocol):

    .venv/bin/python -m benchmarks.mskd --teacher-name resnet8 --teacher-width 4 \
        --teacher-epochs 1 --train-subset 512 --epochs 1 --criteria l1 fpgm \
        --select-steps 1 --name mskd_smoke

Writes benchmarks/results/<name>.json and <name>.md.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from scipy import stats  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import methods, metrics, onednn  # noqa: E402
from tfkdp.methods.mskd import DEFAULT_CRITERIA  # noqa: E402
from tfkdp.train import copy_model  # noqa: E402
from tfkdp.train.phases import Training  # noqa: E402


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=0.5, help="MAC reduction target")
    parser.add_argument("--teacher-name", default="resnet32")
    parser.add_argument("--teacher-width", type=int, default=16)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4, help="total epochs per candidate")
    parser.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA))
    parser.add_argument("--allocations", nargs="+", default=["global"])
    parser.add_argument("--top-k", type=int, default=3, help="mskd's rule, simulated on the scores")
    parser.add_argument("--select-steps", type=int, default=0, help="0: a tenth of an epoch")
    parser.add_argument("--train-subset", type=int, default=0, help="training images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="mskd", help="results file stem under benchmarks/results")
    parser.add_argument("--restart", action="store_true",
                        help="ignore a previous run's results of the same name and setup")
    parser.add_argument("--from-recipes", action="store_true",
                        help="train nothing: τ over the single-candidate mskd rows of "
                             "benchmarks/results/recipes.json (writes <name>_recipes.*)")
    return parser.parse_args()


def _command_line():
    return " ".join(["flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.mskd", *sys.argv[1:]])


def _options(args, **overrides):
    """`methods.get("mskd", ...)` options of this benchmark (one KD phase over all epochs)."""
    options = dict(
        criteria=args.criteria, allocations=args.allocations, top_k=args.top_k,
        select_steps=args.select_steps or None, admm_epochs=args.epochs, finetune_epochs=0,
        round_to=args.round_to, training=Training(learning_rate=args.learning_rate, verbose=2),
    )  # fmt: skip
    options.update(overrides)
    return options


_SELECTION_KEYS = ("select_steps", "bn_batches", "val_source", "selection_seconds")


def _resume_key(args):
    """The options a recorded run must share to be resumed."""
    return {k: getattr(args, k) for k in (
        "target", "teacher_name", "teacher_width", "teacher_epochs", "epochs", "criteria",
        "allocations", "select_steps", "train_subset", "batch_size", "learning_rate", "round_to",
        "seed",
    )}  # fmt: skip


def _previous(args, teacher_info):
    """`(selection, rows, wall seconds)` of an earlier run of the same setup under `--name`, else None.

    The same setup means the same options and the same teacher: a teacher retrained
    (same recipe, another machine: another test accuracy) proposes other candidates.
    """
    path = os.path.join(common.RESULTS_DIR, args.name + ".json")
    if args.restart or not os.path.exists(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if results.get("resume_key") != _resume_key(args) or "selection" not in results:
        print(f"{path} holds another setup: starting over", flush=True)
        return None
    recorded = results["setup"]["teacher"]["test_accuracy"]
    if recorded != teacher_info["test_accuracy"]:
        print(f"{path} was selected with another teacher (test accuracy {recorded} vs "
              f"{teacher_info['test_accuracy']} now): starting over", flush=True)  # fmt: skip
        return None
    return results["selection"], results["candidates"], results["setup"]["wall_seconds"]


def _tau(rows, key):
    done = [r for r in rows if r.get("test_accuracy") is not None]
    if len(done) < 3:
        return None
    tau, p = stats.kendalltau([r[key] for r in done], [r["test_accuracy"] for r in done])
    return {"tau": float(tau), "p_value": float(p), "n": len(done)}


def _rule_pick(rows, top_k):
    """mskd's rule on the recorded scores: top_k by zero-shot, then best short KD."""
    top = sorted(rows, key=lambda r: (-r["zero_shot_acc"], r["zero_shot_kd"]))[:top_k]
    return min(top, key=lambda r: (-r["short_kd_acc"], r["short_kd_kd"]))["id"]


def candidate_row(candidate):
    """A table row of one scored candidate of an `mskd` record (both rungs)."""
    return {
        "id": candidate["id"], "macs": candidate["macs"], "params": candidate["params"],
        "zero_shot_acc": candidate["zero_shot"]["val_accuracy"],
        "zero_shot_kd": candidate["zero_shot"]["val_kd_loss"],
        "zero_shot_neg_kd": -candidate["zero_shot"]["val_kd_loss"],
        "short_kd_acc": candidate["short_kd"]["val_accuracy"],
        "short_kd_kd": candidate["short_kd"]["val_kd_loss"],
        "short_kd_neg_kd": -candidate["short_kd"]["val_kd_loss"],
    }  # fmt: skip


def summarise(rows, top_k):
    """`(Kendall τ per rung score, summary)` of candidate rows (those with a test accuracy count)."""
    done = [r for r in rows if r.get("test_accuracy") is not None]
    taus = {
        "zero_shot_val_accuracy": _tau(rows, "zero_shot_acc"),
        "zero_shot_neg_kd_loss": _tau(rows, "zero_shot_neg_kd"),
        "short_kd_val_accuracy": _tau(rows, "short_kd_acc"),
        "short_kd_neg_kd_loss": _tau(rows, "short_kd_neg_kd"),
    }
    pick = _rule_pick(rows, top_k)
    best = max(done, key=lambda r: r["test_accuracy"]) if done else None
    picked = next((r for r in done if r["id"] == pick), None)
    l1 = next((r for r in done if r["id"] == "l1/global"), None)
    summary = {
        "mskd_rule_pick": pick,
        "pick_test_accuracy": picked and picked["test_accuracy"],
        "best_candidate": best and best["id"],
        "best_test_accuracy": best and best["test_accuracy"],
        "regret": (best["test_accuracy"] - picked["test_accuracy"]) if best and picked else None,
        "l1_global_test_accuracy": l1 and l1["test_accuracy"],
    }
    return taus, summary


def _markdown(rows, taus, summary, top_k, scope=""):
    """The candidates table, the τ lines and the sentence on mskd's rule (`scope`: which rows)."""
    table_rows = [{
        "candidate": r["id"], "MACs (M)": round(r["macs"] / 1e6, 3),
        "zero-shot val acc": round(100 * r["zero_shot_acc"], 2),
        "zero-shot KD loss": round(r["zero_shot_kd"], 4),
        "short-KD val acc": round(100 * r["short_kd_acc"], 2),
        "short-KD KD loss": round(r["short_kd_kd"], 4),
        "final test acc": "-" if r.get("test_accuracy") is None else round(100 * r["test_accuracy"], 2),
        "train s": r.get("train_seconds", "-"),
    } for r in rows]  # fmt: skip
    tau_lines = [
        f"- {k}: " + ("n/a (fewer than 3 finished)" if v is None
                      else f"τ = {v['tau']:.3f} (p = {v['p_value']:.3f}, n = {v['n']})")
        for k, v in taus.items()
    ]  # fmt: skip
    return (
        common.markdown_table(table_rows, list(table_rows[0]))
        + "\n\nKendall τ against the final test accuracy:\n\n" + "\n".join(tau_lines)
        + f"\n\nmskd's rule (top {top_k} by zero-shot, then best short KD){scope} picks "
        f"**{summary['mskd_rule_pick']}**"
        + (f" ({100 * summary['pick_test_accuracy']:.2f} %; best {summary['best_candidate']} "
           f"{100 * summary['best_test_accuracy']:.2f} %, regret "
           f"{100 * summary['regret']:.2f} points)" if summary["regret"] is not None else "")
    )  # fmt: skip


def _report(args, teacher_info, selection, rows, wall):
    done = [r for r in rows if r.get("test_accuracy") is not None]
    taus, summary = summarise(rows, args.top_k)
    setup = {
        "command": _command_line(), "dataset": "Fashion-MNIST (real), test set 10k",
        "train_images": args.train_subset or 60000, "epochs_per_candidate": args.epochs,
        "target_macs_reduction": args.target, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "seed": args.seed, "criteria": args.criteria,
        "allocations": args.allocations, "top_k_rule": args.top_k,
        "select_steps": selection["select_steps"], "bn_batches": selection["bn_batches"],
        "val_source": selection["val_source"], "selection_seconds": selection["selection_seconds"],
        "teacher": teacher_info, "cpu_cores": os.cpu_count(),
        "candidates_finished": len(done), "candidates": len(rows),
        "wall_seconds": round(time.time() - wall, 1),
    }  # fmt: skip
    results = {"candidates": rows, "kendall_tau": taus, "summary": summary, "setup": setup,
               "selection": {k: selection[k] for k in _SELECTION_KEYS},
               "resume_key": _resume_key(args)}  # fmt: skip
    text = (
        "## MS-KD: do the selection rungs predict the final accuracy?\n\n"
        f"Command: `{setup['command']}`. {setup['train_images']} training images, "
        f"{args.epochs} epochs per candidate (short KD of {selection['select_steps']} steps "
        f"included), MAC reduction {args.target}, batch {args.batch_size}, peak LR "
        f"{args.learning_rate}, seed {args.seed}, {setup['cpu_cores']} CPU cores; teacher "
        f"{teacher_info['name']} width {teacher_info['width']}, {teacher_info['epochs']} epochs "
        f"(test accuracy {100 * teacher_info['test_accuracy']:.2f} %). Validation: "
        f"{selection['val_source']}. Selection over {len(rows)} candidates: "
        f"{selection['selection_seconds']:.0f} s.\n\n"
        + _markdown(rows, taus, summary, args.top_k)
        + f". {len(done)} of {len(rows)} candidates finished; wall time "
        f"{setup['wall_seconds']:.0f} s.\n"
    )  # fmt: skip
    common.write_json(os.path.join(common.RESULTS_DIR, args.name + ".json"), results)
    common.write_text(os.path.join(common.RESULTS_DIR, args.name + ".md"), text)
    print(text, flush=True)


def recipes_candidates(recipes, seed):
    """`(rows, full)` from `benchmarks.recipes` results: one row per single-candidate `mskd` row
    of `seed` at the default target (its own rung scores, test accuracy and seconds), and the
    full `mskd` row of that seed (None when absent)."""
    rows = []
    for key, seeds in sorted(recipes.get("runs", {}).items()):
        run = seeds.get(str(seed))
        if "@" in key or not run or run.get("method") != "mskd":
            continue
        options = run["options"]
        if options["top_k"] != 1 or len(options["criteria"]) * len(options["allocations"]) != 1:
            continue
        (candidate,) = run["record"]["mskd"]["candidates"]
        rows.append({**candidate_row(candidate), "row": key, "test_accuracy": run["test_accuracy"],
                     "train_seconds": run["train_seconds"]})  # fmt: skip
    rows.sort(key=lambda r: -r["zero_shot_acc"])
    return rows, recipes.get("runs", {}).get("mskd", {}).get(str(seed))


def from_recipes(args):
    """Kendall τ over the single-candidate rows of recipes.json; writes `<name>_recipes.*`."""
    from benchmarks.recipes import RESULTS as path

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run benchmarks.recipes first")
    with open(path) as f:
        recipes = json.load(f)
    rows, full = recipes_candidates(recipes, args.seed)
    if not rows:
        raise ValueError(f"recipes.json has no single-candidate mskd rows of seed {args.seed}")
    taus, summary = summarise(rows, args.top_k)
    if full is not None:  # where each trained candidate stood in the full selection of that seed
        scored = full["record"]["mskd"]["candidates"]
        order = sorted(scored, key=lambda c: -c["zero_shot"]["val_accuracy"])
        for row in rows:
            rank = next((i for i, c in enumerate(order, 1) if c["id"] == row["id"]), None)
            row["full_zero_shot_rank"] = rank
        winner = full["record"]["mskd"]["winner"]
        summary.update(full_mskd_winner=winner, full_mskd_test_accuracy=full["test_accuracy"],
                       full_mskd_candidates=len(scored),
                       full_mskd_selection_seconds=full["record"]["mskd"]["selection_seconds"])  # fmt: skip
    setup = {
        "command": f".venv/bin/python -m benchmarks.mskd --from-recipes --seed {args.seed}",
        "source": "benchmarks/results/recipes.json", "recipes_setup": recipes["setup"],
        "teacher": recipes["teacher"], "seed": args.seed, "top_k_rule": args.top_k,
    }  # fmt: skip
    results = {"candidates": rows, "kendall_tau": taus, "summary": summary, "setup": setup}
    ranks = "\n" + "".join(
        f"\n- {r['id']} (row `{r['row']}`): zero-shot rank {r['full_zero_shot_rank']} of "
        f"{summary['full_mskd_candidates']} in the full selection"
        for r in rows if r.get("full_zero_shot_rank")
    )  # fmt: skip
    full_line = (
        f"The full `mskd` row of seed {args.seed} picked **{summary['full_mskd_winner']}** from "
        f"{summary['full_mskd_candidates']} candidates ({100 * summary['full_mskd_test_accuracy']:.2f} %"
        f" after its own training; selection {summary['full_mskd_selection_seconds']:.0f} s)."
        + ranks if full is not None else "No full `mskd` row of this seed."
    )  # fmt: skip
    recipe_setup = recipes["setup"]
    text = (
        "## MS-KD: do the selection rungs predict the final accuracy? (recipes rows)\n\n"
        f"Command: `{setup['command']}` (trains nothing). Each row is a one-candidate `mskd` run "
        f"of `benchmarks.recipes` (top_k 1: its own zero-shot and short-KD scores, then KD to the "
        f"end), seed {args.seed}: {recipe_setup['train_images']} training images, "
        f"{recipe_setup['epochs_per_method']} epochs (short KD included), MAC reduction target "
        f"{recipe_setup['target_macs_reduction']}, teacher resnet32 "
        f"({100 * recipes['teacher']['test_accuracy']:.2f} %).\n\n"
        + _markdown(rows, taus, summary, args.top_k, scope=f" over these {len(rows)}")
        + f". {full_line}\n"
    )  # fmt: skip
    stem = os.path.join(common.RESULTS_DIR, args.name + "_recipes")
    common.write_json(stem + ".json", results)
    common.write_text(stem + ".md", text)
    print(text, flush=True)
    return results


def main():
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    args = _parse()
    if args.from_recipes:
        from_recipes(args)
        return
    wall = time.time()
    keras.utils.set_random_seed(args.seed)
    teacher, teacher_info = common.get_teacher(
        name=args.teacher_name, epochs=args.teacher_epochs, width=args.teacher_width
    )
    budget = methods.Budget.macs(args.target)

    previous = _previous(args, teacher_info)
    if previous is not None:
        selection, rows, earlier = previous
        wall -= earlier  # the wall time counts every process of the run
        left = [r["id"] for r in rows if r.get("test_accuracy") is None]
        print(f"resuming {args.name}: the recorded selection; candidates left to train: {left}",
              flush=True)  # fmt: skip
    else:
        # 1. Both rungs on every candidate: top_k = the number of candidates.
        n = len(args.criteria) * len(args.allocations)
        train, _ = common.datasets(args.batch_size, args.seed, args.train_subset or None)
        selector = methods.get("mskd", **_options(args, top_k=n))
        keras.utils.set_random_seed(args.seed)
        selection = selector.select(teacher, copy_model(teacher), train, None, budget)["record"]
        rows = [candidate_row(c) for c in selection["candidates"] if not c["duplicate_of"]]
        keras.backend.clear_session()
        _report(args, teacher_info, selection, rows, wall)

    # 2. Every distinct candidate trained to the end, alone, under the same step budget.
    for row in rows:
        if row.get("test_accuracy") is not None:
            continue
        criterion, allocation = row["id"].split("/")
        keras.utils.set_random_seed(args.seed)
        train, _ = common.datasets(args.batch_size, args.seed, args.train_subset or None)
        method = methods.get(
            "mskd", **_options(args, criteria=[criterion], allocations=[allocation], top_k=1)
        )
        start = time.time()
        result = method.compress(teacher, None, train, None, budget)
        row["train_seconds"] = round(time.time() - start, 1)
        row["test_accuracy"] = common.test_accuracy(result.model)
        row["stripped_macs"] = metrics.count_macs(result.model)
        keras.backend.clear_session()
        _report(args, teacher_info, selection, rows, wall)


if __name__ == "__main__":
    main()

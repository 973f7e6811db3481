"""Which recipe for my model: every method from one teacher at one budget, in one resumable run.

`tfkdp-compress --method=kdp,ddsl,pdc` (or `--method=all`, or one method with
`--seeds=0,1`) checks every method's options and budget, trains (or loads) the
teacher once under `output_dir/teacher/`, then runs each method's own stages
(compress … report, `tfkdp.pipelines.workflow`) under `output_dir/<method>/`
(`output_dir/<method>/seed<k>/` with several seeds). Every method gets the
same budget, the same total number of training epochs (split over its own
phases by `Method.split_epochs`, recorded per row), the same seed and data
order.

`comparison_state.json` records each run when it finishes or fails: a killed
run resumes inside the method it was in (that method's own stages resume),
and a finished method is not opened again. A method that fails (an
unreachable budget, a diverged loss, any error) is recorded with its error
and the others still run; the comparison (`tfkdp.pipelines.comparison`) is
rewritten after every run, and the best method's run is copied to
`output_dir/best/` at the end.
"""

import copy
import json
import os
import shutil
import time

import keras

from tfkdp.export._atomic import write_json_atomic
from tfkdp.pipelines import comparison as comparison_lib
from tfkdp.pipelines.config import STAGE_FLAGS

STATE_FILE = "comparison_state.json"
BEST_DIR = "best"
# Flags of the comparison itself, not of one method's run.
COMPARE_FLAGS = ("seeds", "deploy_format")
DEPLOY_FORMATS = ("tflite", "tflite_f16", "tflite_dynamic", "tflite_int8", "tflite_sparse")


def parse_methods(spec):
    """The method names of `--method`: one name, a comma-separated list, or `all`.

    Args:
        spec: a string (`"kdp"`, `"kdp,pdc"`, `"all"`) or a list of names.

    Returns:
        The names, in the given order (`all`: registry order, so methods
        registered later are included with no change here).

    Raises:
        ValueError: for an empty list, a repeated name, or an unknown name
            (listing the registered ones).
    """
    from tfkdp import methods

    parts = list(spec) if isinstance(spec, (list, tuple)) else str(spec).split(",")
    parts = [str(p).strip() for p in parts if str(p).strip()]
    if parts == ["all"]:
        return methods.names()
    if not parts:
        raise ValueError(f"--method is empty; give a name, a list or 'all' from {methods.names()}")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise ValueError(f"--method names {repeated} more than once; received {','.join(parts)!r}")
    for name in parts:
        methods.get_class(name)  # unknown: ValueError listing the registered names
    return parts


def parse_seeds(values):
    """`--seeds` as a list of ints (`--seed` alone when it is empty)."""
    raw = values.get("seeds") or [values["seed"]]
    seeds = []
    for value in raw:
        text = str(value).strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"--seeds must be integers, e.g. 0,1,2; received {value!r}")
        seeds.append(int(text))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed; received {seeds}")
    return seeds


def is_comparison(values):
    """Whether the flags ask for several methods or several seeds (this module's run)."""
    return len(parse_methods(values["method"])) > 1 or len(parse_seeds(values)) > 1


def run_key(method, seed, several_seeds):
    """The run's key and folder under output_dir: `<method>` or `<method>/seed<k>`."""
    return f"{method}/seed{seed}" if several_seeds else method


def method_values(values, method, seed, teacher, output_dir):
    """The flags of one method's run, and its epoch split (`Method.split_epochs`).

    The total is `--compress_epochs + --finetune_epochs` for every method.
    """
    from tfkdp import methods

    run = {k: v for k, v in values.items() if k not in COMPARE_FLAGS}
    run.update(method=method, seed=seed, teacher=teacher, output_dir=output_dir)
    total = values["compress_epochs"] + values["finetune_epochs"]
    split = methods.get_class(method).split_epochs(total, values["finetune_epochs"], run)
    run.update(split)
    epochs = {k: run[k] for k in ("compress_epochs", "finetune_epochs")}
    epochs.update({k: v for k, v in split.items() if k not in epochs})
    return run, epochs


def check(values):
    """Checks the comparison's own flags; returns `(methods, seeds)`.

    Raises:
        ValueError: an unknown method, bad seeds, a deploy format that is not
            a LiteRT format or not exported, or `--strategy=multiworker`.
    """
    names, seeds = parse_methods(values["method"]), parse_seeds(values)
    deploy = values.get("deploy_format", "tflite")
    if deploy not in DEPLOY_FORMATS:
        raise ValueError(f"--deploy_format={deploy!r} must be a LiteRT format, one of {list(DEPLOY_FORMATS)}")
    if deploy not in values["formats"]:
        raise ValueError(f"--deploy_format={deploy!r} is not among --formats={','.join(values['formats'])}")
    if values.get("strategy") == "multiworker":
        raise ValueError(
            "several methods or seeds in one run are not supported under --strategy=multiworker "
            "(a failing method would stop the workers apart): run one --method per job"
        )
    return names, seeds


def _wipe(output_dir, names):
    """--restart: the teacher's stage, every method's folder and the comparison files."""
    for name in names:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    shutil.rmtree(os.path.join(output_dir, BEST_DIR), ignore_errors=True)
    for name in (STATE_FILE, "comparison.json", "comparison.md", "pareto_macs.png", "pareto_latency.png"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _one_line(error):
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _preflight(ctx, values, names, seeds, teacher):
    """`{method: error}` of the methods whose options or budget fail `workflow.preflight`."""
    from tfkdp.pipelines import workflow

    failed = {}
    for name in names:
        run, _ = method_values(values, name, seeds[0], teacher, values["output_dir"])
        method_ctx = copy.copy(ctx)
        method_ctx.flags = run
        try:
            workflow.preflight(method_ctx)
        except (ValueError, FileNotFoundError) as error:
            failed[name] = _one_line(error)
            print(f"[compare] {name}: will not run: {failed[name]}", flush=True)
    return failed


def run(values, restart=False):
    """Runs (or resumes) the teacher once and every method and seed; writes the comparison.

    Args:
        values: the resolved flags of `tfkdp-compress`, with `method` a list
            (or `all`), plus `seeds` and `deploy_format`.
        restart: discard the teacher, every method's folder and the
            comparison, and start over.

    Returns:
        `(markdown, failed)`: the comparison as Markdown, and the keys of the
        runs that failed (empty when all finished).

    Raises:
        ValueError: bad comparison flags, or no method can run (before the
            teacher is trained).
    """
    from tfkdp.pipelines import context, workflow
    from tfkdp.pipelines.state import StageRunner, read_state

    names, seeds = check(values)
    values = dict(values)
    output_dir = os.path.abspath(values["output_dir"])
    values["output_dir"] = output_dir
    several = len(seeds) > 1
    if restart:
        os.makedirs(output_dir, exist_ok=True)
        _wipe(output_dir, names)
    # The shared teacher: the pipeline's own teacher stage, run once with the first seed.
    teacher_flags = {k: v for k, v in values.items() if k not in ("output_dir", *COMPARE_FLAGS)}
    teacher_flags["seed"] = seeds[0]
    runner = StageRunner(output_dir, teacher_flags, {"teacher": STAGE_FLAGS["teacher"]},
                         restart=restart)  # fmt: skip
    ctx = workflow.Context(teacher_flags, runner)  # loads and checks the data once
    early = _preflight(ctx, values, names, seeds, values["teacher"])
    if len(early) == len(names):
        raise ValueError("no method can run: " + "; ".join(f"{k}: {v}" for k, v in early.items()))
    was_done = runner.done("teacher")
    runner.run("teacher", lambda work: workflow.stage_teacher(ctx, work))
    teacher_summary = runner.record("teacher")["summary"]
    teacher_path = context.teacher_path(ctx)
    print(f"[compare] teacher done ({'resumed: finished earlier' if was_done else 'trained'}): "
          f"{teacher_path}", flush=True)  # fmt: skip

    state_path = os.path.join(output_dir, STATE_FILE)
    state = read_state(state_path, runs={})
    total = len(names) * len(seeds)
    index = 0
    written = None
    for name in names:
        for seed in seeds:
            index += 1
            key = run_key(name, seed, several)
            run_dir = os.path.join(output_dir, key)
            run_values, epochs = method_values(values, name, seed, teacher_path, run_dir)
            entry = {"method": name, "seed": seed, "dir": key, "epochs": epochs}
            previous = state["runs"].get(key, {})
            if previous.get("status") == "ok" and os.path.exists(os.path.join(run_dir, "report.json")):
                print(f"[compare {index}/{total}] {key}: finished earlier, not rerun", flush=True)
                continue
            if name in early:
                entry.update(status="failed", error=early[name], stage="preflight")
            else:
                print(f"[compare {index}/{total}] {key}: epochs {epochs} → {run_dir}", flush=True)
                start = time.time()
                try:
                    workflow.run(run_values)
                    entry["status"] = "ok"
                except workflow.ArtifactsRejectedError as error:  # the report of the others exists
                    entry.update(status="ok", rejected=sorted(error.rejected))
                except Exception as error:  # noqa: BLE001 - one method's failure must not stop the others
                    entry.update(status="failed", error=_one_line(error))
                    print(f"[compare {index}/{total}] {key}: FAILED: {entry['error']}", flush=True)
                entry["seconds"] = round(time.time() - start, 1)
                keras.backend.clear_session()  # the next method starts from its files, not this graph
            state["runs"][key] = entry
            write_json_atomic(state_path, state)
            written = write_comparison(output_dir, values, names, seeds, teacher_summary, runner, state)
    if written is None:  # every run finished earlier: nothing in the loop wrote the comparison
        written = write_comparison(output_dir, values, names, seeds, teacher_summary, runner, state)
    markdown, best = written
    copy_best(output_dir, best, state)
    failed = [k for k, e in state["runs"].items()
              if e["status"] != "ok" and e["method"] in names and e["seed"] in seeds]  # fmt: skip
    return markdown, failed


def write_comparison(output_dir, values, names, seeds, teacher_summary, runner, state):
    """Reads the finished runs' reports, writes the comparison; returns `(markdown, best run key)`."""
    runs, failures = [], []
    for key, entry in state["runs"].items():
        if entry["method"] not in names or entry["seed"] not in seeds:
            continue
        if entry["status"] != "ok":
            failures.append({k: entry.get(k) for k in ("method", "seed", "error", "epochs", "stage")})
            continue
        with open(os.path.join(output_dir, key, "report.json")) as f:
            report = json.load(f)
        threads = values["threads"][0]
        runs.append(comparison_lib.run_row(report, entry, values.get("deploy_format", "tflite"), threads))
    teacher = {k: teacher_summary.get(k) for k in ("accuracy", "macs", "params")}
    teacher["seconds"] = runner.record("teacher")["seconds"]
    budget = {"target_macs_reduction": values["target_macs_reduction"],
              "target_latency_ms": values.get("target_latency_ms"),
              "target_latency_reduction": values.get("target_latency_reduction")}  # fmt: skip
    setup = {
        "teacher": values["teacher"], "methods": names, "seeds": seeds,
        "total_epochs": values["compress_epochs"] + values["finetune_epochs"],
        "deploy_format": values.get("deploy_format", "tflite"), "threads": values["threads"][0],
        "dataset": values["dataset"],
    }  # fmt: skip
    result = comparison_lib.build(teacher, runs, failures, names, budget, setup)
    markdown = comparison_lib.write(result, output_dir)
    best_key = None
    if result["best"]:
        best_runs = [r for r in runs if r["method"] == result["best"]]
        best_key = max(best_runs, key=lambda r: r["test_accuracy"])["dir"]
    return markdown, best_key


def copy_best(output_dir, best_key, state):
    """Copies the best run's folder (the best seed of the best method) to `output_dir/best/`.

    The copy is made in a temp folder and renamed; the method's resumable
    state and TensorBoard logs are left out. `best/best.json` names the run.
    """
    target = os.path.join(output_dir, BEST_DIR)
    if best_key is None:
        shutil.rmtree(target, ignore_errors=True)
        return
    marker = os.path.join(target, "best.json")
    source = os.path.join(output_dir, best_key)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("run") == best_key:
                return
    tmp = os.path.join(output_dir, f".{BEST_DIR}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(".resume", "tb", ".*-*"))
    write_json_atomic(os.path.join(tmp, "best.json"), {"run": best_key, **state["runs"][best_key]})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    print(f"[compare] best: {best_key} (copied to {target})", flush=True)

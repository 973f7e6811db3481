"""Wiring of the compress pipeline's stages: library calls only, one function per stage.

The strategy and multi-worker wiring lives in `distributed`, the checks of the
inputs (and the resolution of `--round_to`) in `validate`, what the stages share
(`Context`) in `context`, and the deployment stages (export, verify, latency) in
`deploy`.
"""

import json
import os
import shutil
import sys

import keras
import numpy as np
from absl import logging

from tfkdp.export._atomic import tree_size_bytes, write_json_atomic
from tfkdp.pipelines import distributed, validate
from tfkdp.pipelines import report as report_lib
from tfkdp.pipelines.config import RESUME_DIR, STAGE_FLAGS, STAGES
from tfkdp.pipelines.context import Context, load_teacher, teacher_path
from tfkdp.pipelines.deploy import (
    CALIBRATION_SAMPLES,
    REJECTED_DIR,
    ArtifactsRejectedError,
    stage_export,
    stage_latency,
    stage_verify,
    verified_artifacts,
)
from tfkdp.pipelines.distributed import TRAINING_STAGES, worker_dir
from tfkdp.pipelines.state import StageRunner

# Their former names here, which tests and scripts reach through `workflow`.
_log_global_batch = distributed.log_global_batch
_resolve_round_to = validate.resolve_round_to_flag
__all__ = [
    "CALIBRATION_SAMPLES", "REJECTED_DIR", "ArtifactsRejectedError", "Context", "budget_of",
    "load_teacher", "preflight", "run", "stage_export", "stage_latency", "stage_verify",
]  # fmt: skip


def _verbose():
    # Progress bars in a terminal; one line per epoch in logs and CI.
    return 1 if sys.stdout.isatty() else 2


def _callbacks(ctx, stage):
    """TensorBoard logs of a training stage under output_dir/tb/<stage>."""
    log_dir = os.path.join(ctx.runner.output_dir, "tb", stage)
    shutil.rmtree(log_dir, ignore_errors=True)  # a rerun of the stage replaces its logs
    return [keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False, profile_batch=0)]


def _load_student(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--student {path!r} does not exist")
    if os.path.isdir(path) or not path.endswith((".keras", ".h5")):
        raise ValueError(
            f"--student {path!r} must be a .keras or .h5 file (a SavedModel is inference-only)"
        )
    return keras.saving.load_model(path)


def _summary(model, ctx):
    from tfkdp import metrics

    return {
        "accuracy": ctx.test_accuracy(model),
        "macs": metrics.count_macs(model),
        "params": metrics.count_params(model),
    }


def stage_teacher(ctx, work):
    from tfkdp import models
    from tfkdp.train import phases

    spec = ctx.flags["teacher"]
    if spec in models.names():
        keras.utils.set_random_seed(ctx.flags["seed"])
        with distributed.scope(ctx):
            model = models.get(spec, input_shape=ctx.input_shape, num_classes=ctx.num_classes)
        train, val = ctx.datasets()
        training = phases.Training(
            learning_rate=ctx.flags["teacher_lr"], callbacks=tuple(_callbacks(ctx, "teacher")),
            verbose=_verbose(), backup_dir=distributed.backup_dir(ctx, "teacher"),
        )
        with distributed.scope(ctx):
            # The guarded supervised phase: a NaN/inf loss stops with NonFiniteLossError.
            phases.finetune(model, train, val, ctx.flags["teacher_epochs"], training, "teacher")
        # Moving batch-norm statistics lag behind a short, high-LR run (a MobileNetV2 with
        # momentum 0.999 scored 10 % after 5 epochs): the teacher every method distils from and
        # the report's teacher row use statistics re-estimated on training batches.
        phases.recalibrate(model, train, training)
        model.save(os.path.join(work, "teacher.keras"))
        return _checked_teacher(dict(_summary(model, ctx), trained_here=True, path="teacher.keras"), ctx)
    from tfkdp.distill.distiller import load_teacher as load

    model = load(spec, input_shape=ctx.input_shape)
    validate.check_model_io(model, ctx, "teacher")
    if os.path.isdir(spec):
        # A SavedModel runs inference-only through TFSMLayer: its cost is not countable.
        return {
            "accuracy": ctx.test_accuracy(model), "macs": None, "params": None,
            "trained_here": False, "path": os.path.abspath(spec),
        }
    return _checked_teacher(dict(_summary(model, ctx), trained_here=False, path=os.path.abspath(spec)), ctx)


def _checked_teacher(summary, ctx):
    """`summary`, after a warning when the teacher's test accuracy is near chance (1 / classes)."""
    chance = 1.0 / ctx.num_classes
    if summary["accuracy"] is not None and summary["accuracy"] < 1.5 * chance:
        logging.warning(
            "the teacher's test accuracy %.2f %% is near chance (%.2f %% for %d classes): check its "
            "input scaling (--input_scaling) and its batch-norm statistics; a student distilled from "
            "it learns little from the teacher", 100 * summary["accuracy"], 100 * chance, ctx.num_classes,
        )  # fmt: skip
    return summary


def build_student(ctx, teacher):
    from tfkdp import models

    spec = ctx.flags["student"]
    if spec == "teacher":
        if os.path.isdir(teacher_path(ctx)):
            raise ValueError(
                "--student=teacher needs a Keras teacher (.keras/.h5 or a zoo name); a SavedModel "
                "teacher is inference-only: pass --student=<zoo name or .keras path>"
            )
        student = keras.models.clone_model(teacher)
        student.set_weights(teacher.get_weights())
        return student
    if spec in models.names():
        keras.utils.set_random_seed(ctx.flags["seed"])
        return models.get(spec, input_shape=ctx.input_shape, num_classes=ctx.num_classes)
    student = _load_student(spec)
    validate.check_model_io(student, ctx, "student")
    return student


def _method(ctx, stage=None):
    """The registered method of `--method`, with the pipeline's options.

    `stage`: the training stage whose TensorBoard logs the method's phases write.
    """
    from tfkdp import methods
    from tfkdp.distill.losses import SoftTargetKD
    from tfkdp.train.phases import Training

    training = Training(
        learning_rate=ctx.flags["lr"],
        distillation_losses=(SoftTargetKD(temperature=ctx.flags["temperature"]),),
        callbacks=tuple(_callbacks(ctx, stage)) if stage else (),
        verbose=_verbose(), backup_dir=distributed.backup_dir(ctx, stage),
    )
    cls = methods.get_class(ctx.flags["method"])
    method = cls(**cls.pipeline_options(ctx.flags, training))
    if stage is not None:
        # Resumable state inside a stage: outside the stage's temp folder, so a
        # killed run keeps it; dropped with --restart.
        method.state_dir = os.path.join(ctx.runner.output_dir, RESUME_DIR, stage)
        os.makedirs(method.state_dir, exist_ok=True)
    return method


def _budget(ctx):
    """A latency budget (on `--latency_runtime`) when given, else `--target_macs_reduction`."""
    return budget_of(ctx.flags)


def budget_of(flags):
    """The pipeline's `Budget` from its flags."""
    from tfkdp.methods import Budget

    ms, reduction = flags.get("target_latency_ms"), flags.get("target_latency_reduction")
    if ms is not None and reduction is not None:
        raise ValueError(
            f"pass one latency budget: --target_latency_ms={ms:g} or --target_latency_reduction="
            f"{reduction:g}, not both"
        )
    if reduction is not None:
        return Budget.latency(reduction, flags.get("latency_runtime", "litert"), flags.get("latency_threads", 1))
    if ms is not None:
        return Budget.latency_ms(flags["target_latency_ms"], flags.get("latency_runtime", "litert"),
                                 flags.get("latency_threads", 1))  # fmt: skip
    return Budget.macs(flags["target_macs_reduction"])


def _load_pruned(ctx, stage, model_name):
    from tfkdp.methods import Pruned
    from tfkdp.pruning import PruningPlan

    model = keras.saving.load_model(ctx.path(stage, model_name))
    with open(ctx.path("compress", "plan.json")) as f:
        plan = PruningPlan.from_json(f.read())
    summary = ctx.runner.record(stage)["summary"]
    return Pruned(model, plan, dict(summary.get("history", {})), dict(summary.get("record", {})))


def _jsonable_history(history):
    return {
        phase: {k: [float(v) for v in values] for k, values in logs.items()}
        for phase, logs in history.items()
    }


def stage_compress(ctx, work):
    """`Method.prune`: the method's training and pruning up to the hard prune.

    Writes `masked.keras` (the student with pruned channels held at zero by
    masks) and `plan.json`.
    """
    train, val = ctx.datasets(ctx.flags["compress_train_subset"])
    method = _method(ctx, "compress")
    with distributed.scope(ctx):
        teacher = load_teacher(ctx)
        student = build_student(ctx, teacher)
        unprunable = _unprunable_groups(student)
        pruned = method.prune(teacher, student, train, val, _budget(ctx))
    pruned.model.save(os.path.join(work, "masked.keras"))
    with open(os.path.join(work, "plan.json"), "w") as f:
        f.write(pruned.plan.to_json())
    return {
        "plan": json.loads(pruned.plan.to_json()), "channels": pruned.record.get("channels", {}),
        "history": _jsonable_history(pruned.history), "record": pruned.record,
        "unprunable_groups": unprunable,
    }  # fmt: skip


def _unprunable_groups(model):
    """`[{group, size, producers, reason}]` of the channel groups tfkdp may not prune, and why.

    From the channel-group analysis (`tfkdp.channel_groups`): the model input
    and output groups always, plus any group meeting a layer that mixes
    channels or a layer type nobody registered.
    """
    from tfkdp.pruning import channel_groups

    return [
        {"group": g.id, "size": int(g.size), "producers": list(g.producers), "reason": g.reason}
        for g in channel_groups(model) if not g.prunable
    ]  # fmt: skip


def stage_finetune(ctx, work):
    """`Method.finetune`: the method's training of the masked student (and BN re-estimation)."""
    train, val = ctx.datasets(ctx.flags["compress_train_subset"])
    method = _method(ctx, "finetune")
    with distributed.scope(ctx):
        teacher = load_teacher(ctx)
        pruned = _load_pruned(ctx, "compress", "masked.keras")
        pruned = method.finetune(teacher, pruned, train, val)
    pruned.model.save(os.path.join(work, "masked.keras"))
    return {"history": _jsonable_history(pruned.history), "record": pruned.record}


def stage_strip(ctx, work):
    """`Method.finalize`: the deployable model; checked to compute what the masked one does."""
    method = _method(ctx)
    pruned = _load_pruned(ctx, "finetune", "masked.keras")
    small = method.finalize(pruned)
    x, _ = ctx.test_inputs(256)
    expected = pruned.model.predict(x, verbose=0)
    got = small.predict(x, verbose=0)
    diff = float(np.max(np.abs(expected - got)))
    scale = float(np.max(np.abs(expected))) or 1.0
    # 1e-4 of the output scale, the float32 bound of export.verify: sums in another order,
    # amplified through ~50 batch norms in a keras.applications model (MobileNetV2: 1.4e-5
    # measured), while a wrong layer is O(1).
    if diff > 1e-4 * scale:
        raise ValueError(
            f"stripped model differs from the masked model by {diff:.3g} (output scale "
            f"{scale:.3g}); refusing to continue with a model that computes something else"
        )
    small.save(os.path.join(work, "student.keras"))
    return dict(_summary(small, ctx), max_abs_diff_vs_masked=diff)


def stage_report(ctx, work):
    """report.json, report.md and plots, with non-zero parameters, sizes and Performance Efficiency.

    Performance Efficiency (`tfkdp.metrics.performance_efficiency`) takes the
    teacher as the reference: for non-zero parameters and MACs its Keras
    model; for file size, gzip size and latency its float32 `tflite` export,
    timed by the latency stage interleaved with the student's artifacts. The
    accuracy is the student's Keras test accuracy for every cost.
    `latency_comparison` puts teacher and student side by side per runtime and
    thread count: p50/p90, speedup, and speedup ÷ MAC speedup.
    """
    from tfkdp import metrics
    from tfkdp.export._atomic import gzip_size_bytes

    runner = ctx.runner
    teacher = {k: runner.record("teacher")["summary"][k] for k in ("accuracy", "macs", "params")}
    final = runner.record("strip")["summary"]
    compress = runner.record("compress")["summary"]
    student = {k: final[k] for k in ("accuracy", "macs", "params")}
    student_model = keras.saving.load_model(ctx.path("strip", "student.keras"))
    student["nonzero_params"] = metrics.count_nonzero_params(student_model)
    student["record"] = runner.record("finetune")["summary"].get("record")
    student["plan"] = compress.get("plan")
    student["channels"] = compress.get("channels", {})
    student["unprunable_groups"] = compress.get("unprunable_groups", [])
    verify = runner.record("verify")["summary"]["results"]
    rejected = [
        {"format": fmt, "path": entry["path"], "reason": entry["reason"],
         "runtime": verify[fmt].get("runtime"), "n": verify[fmt].get("n"),
         "max_abs_diff": verify[fmt].get("max_abs_diff"),
         "top1_agreement": verify[fmt].get("top1_agreement"),
         "accuracy": verify[fmt].get("accuracy"), "error": verify[fmt].get("error"),
         "failed_checks": [c for c in verify[fmt].get("checks", []) if not c["passed"]]}
        for fmt, entry in runner.record("verify")["summary"].get("rejected", {}).items()
    ]  # fmt: skip
    summary = runner.record("latency")["summary"]
    all_rows = summary["rows"]
    latency = [r for r in all_rows if r.get("label") is None]
    teacher_rows = [r for r in all_rows if r.get("label") == "teacher"]

    # The teacher's reference costs (a SavedModel teacher is inference-only: none): its
    # float32 tflite, timed by the latency stage in the same interleaved blocks.
    reference = None
    teacher["nonzero_params"] = None
    if not os.path.isdir(teacher_path(ctx)):
        teacher["nonzero_params"] = metrics.count_nonzero_params(load_teacher(ctx))
        path = summary.get("teacher_artifact")
        path = ctx.path("latency", path) if path else None
        if path and os.path.exists(path):
            reference = {
                "format": "tflite", "size_bytes": tree_size_bytes(path),
                "gzip_bytes": gzip_size_bytes(path),
                "latency_ms_p50": {str(r["threads"]): r["p50_ms"] for r in teacher_rows
                                   if r["format"] == "tflite"},
                "latency_ms_p90": {str(r["threads"]): r["p90_ms"] for r in teacher_rows
                                   if r["format"] == "tflite"},
            }  # fmt: skip
    teacher["reference_artifact"] = reference

    def efficiency(cost, reference_cost):
        if not cost or not reference_cost or not teacher.get("accuracy"):
            return None
        return metrics.performance_efficiency(
            student["accuracy"], teacher["accuracy"], cost, reference_cost
        )

    # Teacher and student side by side, per runtime and thread count (same format, float32).
    mac_speedup = teacher["macs"] / student["macs"] if teacher.get("macs") and student.get("macs") else None
    comparison = []
    for t in teacher_rows:
        s_row = next((r for r in latency if r["format"] == t["format"]
                      and r["threads"] == t["threads"]), None)  # fmt: skip
        if s_row is None:
            continue
        speedup = t["p50_ms"] / s_row["p50_ms"] if s_row["p50_ms"] else None
        comparison.append({
            "format": t["format"], "runtime": t["runtime"], "threads": t["threads"],
            "teacher_p50_ms": t["p50_ms"], "teacher_p90_ms": t["p90_ms"],
            "student_p50_ms": s_row["p50_ms"], "student_p90_ms": s_row["p90_ms"],
            "speedup": speedup, "mac_speedup": mac_speedup,
            "speedup_over_mac_speedup": (speedup / mac_speedup
                                         if speedup and mac_speedup else None),
        })  # fmt: skip

    student["performance_efficiency"] = {
        "reference": "teacher",
        "nonzero_params": efficiency(student["nonzero_params"], teacher["nonzero_params"]),
        "macs": efficiency(student["macs"], teacher["macs"]),
    }
    artifacts = []
    for fmt, path in verified_artifacts(ctx).items():
        checked = verify.get(fmt, {})
        timed = [r for r in latency if r.get("format") == fmt] or [{}]
        size, gz = tree_size_bytes(path), gzip_size_bytes(path)
        for row in timed:
            p50 = row.get("p50_ms")
            ref_p50 = (reference or {}).get("latency_ms_p50", {}).get(str(row.get("threads")))
            artifacts.append({
                "format": fmt,
                "path": os.path.relpath(path, runner.output_dir),
                "size_bytes": size,
                "gzip_bytes": gz,
                "max_abs_diff": checked.get("max_abs_diff"),
                "top1_agreement": checked.get("top1_agreement"),
                "accuracy": checked.get("accuracy"),
                "runtime": row.get("runtime"),
                "latency_ms_p50": p50,
                "latency_ms_p90": row.get("p90_ms"),
                "threads": row.get("threads"),
                "performance_efficiency": {
                    "size_bytes": efficiency(size, (reference or {}).get("size_bytes")),
                    "gzip_bytes": efficiency(gz, (reference or {}).get("gzip_bytes")),
                    "latency_ms_p50": efficiency(p50, ref_p50),
                },
            })
    stages = {s: runner.record(s)["seconds"] for s in STAGES if s != "report" and runner.done(s)}
    report = {
        "teacher": teacher, "student": student, "artifacts": artifacts, "rejected": rejected,
        "latency_comparison": comparison,
        "stages": stages,
        "flags": ctx.flags, "baselines": compress.get("baselines", []),
        # --round_to=auto: what was measured and chosen (None for an integer --round_to).
        "round_to_auto": getattr(ctx, "alignment", None),
        # The method's own tables and plots (e.g. mskd's candidates, ddsl's dean.png).
        "method_report": _method(ctx).report(student["record"] or {}, work),
    }  # fmt: skip
    return {"markdown": report_lib.write(report, work)}


_STAGE_FNS = {
    "teacher": stage_teacher, "compress": stage_compress, "finetune": stage_finetune,
    "strip": stage_strip, "export": stage_export, "verify": stage_verify,
    "latency": stage_latency, "report": stage_report,
}


def preflight(ctx):
    """Checks the teacher, the student and the budget before any training.

    A zoo name that does not exist, a model file that is missing or cannot be
    loaded, or a MAC budget the student's architecture cannot reach is a
    `ValueError`/`FileNotFoundError` now, not after the teacher was trained.
    """
    from tfkdp import models

    flags = ctx.flags
    validate.resolve_round_to_flag(ctx)
    teacher_kind = validate.check_model_spec(flags["teacher"], "teacher")
    student_kind = validate.check_model_spec(
        flags["student"], "student", allow_savedmodel=False, keywords=("teacher",)
    )
    method = _method(ctx)  # the method's own options are checked here, before any training
    budget = budget_of(flags)
    if not getattr(method, "prunes", True):
        if budget.is_latency:
            raise ValueError(
                f"a latency budget (--target_latency_ms, --target_latency_reduction) does not apply to "
                f"--method={flags['method']}: it removes no "
                "channels, so the dense latency does not change; use a channel-pruning method"
            )
        return
    method.check_budget(budget)
    spec, kind = (flags["teacher"], teacher_kind) if student_kind == "keyword" else (
        flags["student"], student_kind
    )
    if kind == "zoo":
        architecture = models.get(spec, input_shape=ctx.input_shape, num_classes=ctx.num_classes)
    elif os.path.isdir(spec):
        return  # a SavedModel cannot be the student; build_student says so
    else:
        architecture = validate.check_keras_file(spec, "teacher" if student_kind == "keyword" else "student")
    validate.check_budget_with_alignment(ctx, architecture, budget)


def run(values, restart=False):
    """Runs (or resumes) every stage; returns the report as Markdown.

    Under `--strategy=multiworker` a non-chief worker runs the training
    stages (`TRAINING_STAGES`) in its own folder (`worker_dir`), removes it
    and returns a one-line note: strip, export, verify, latency and the report
    are the chief's.

    Raises:
        ArtifactsRejectedError: (a `RuntimeError`) after the report is
            written, if some artifacts failed verification (they are in
            `output_dir/export/rejected/` and the report's `rejected` list).
        VerificationError: with `strict_verify`, at the verify stage, before
            any report.
    """
    from tfkdp import runtime

    values = dict(values)
    if str(values.get("round_to", "")).strip().isdigit():
        # One recorded value for `--round_to=8` (a string flag, as `auto` is) and `round_to=8`.
        values["round_to"] = int(values["round_to"])
    own_dir = worker_dir(values)
    output_dir = own_dir or values["output_dir"]
    flags_only = {k: v for k, v in values.items() if k != "output_dir"}
    runner = StageRunner(output_dir, flags_only, STAGE_FLAGS, restart=restart)
    write_json_atomic(os.path.join(runner.output_dir, "flags.json"), values)
    previous_policy = runtime.set_mixed_precision(values.get("mixed_precision", "none"))
    try:
        return _run_stages(values, runner, own_dir)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _run_stages(values, runner, own_dir):
    flags_only = {k: v for k, v in values.items() if k != "output_dir"}
    ctx = Context(flags_only, runner)  # loads and checks the data (NaN/inf, shapes, labels)
    preflight(ctx)
    training = [s for s in STAGES if s in TRAINING_STAGES]
    for index, stage in enumerate(training, 1):
        _run_stage(ctx, runner, index, stage)
    try:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)  # a finished worker leaves nothing behind
            return f"worker done: training stages {training}; the chief writes the outputs"
        for index, stage in enumerate(STAGES, 1):
            if stage not in TRAINING_STAGES:
                _run_stage(ctx, runner, index, stage)
        return _finish(runner)
    finally:
        distributed.barrier(ctx)  # also when a chief-only stage fails, so no worker waits forever


def _run_stage(ctx, runner, index, stage):
    was_done = runner.done(stage)
    runner.run(stage, lambda work, s=stage: _STAGE_FNS[s](ctx, work))
    # The stage is recorded: the method's resumable state inside it is spent.
    shutil.rmtree(os.path.join(runner.output_dir, RESUME_DIR, stage), ignore_errors=True)
    seconds = runner.record(stage)["seconds"]
    note = "resumed: finished earlier" if was_done else f"{seconds:.1f} s"
    print(f"[{index}/{len(STAGES)}] {stage:<9} done ({note})", flush=True)


def _finish(runner):
    summary = runner.record("report")["summary"]
    report_dir = runner.stage_dir("report")
    for name in os.listdir(report_dir):
        shutil.copy2(os.path.join(report_dir, name), os.path.join(runner.output_dir, name))
    markdown = summary["markdown"] if isinstance(summary, dict) and "markdown" in summary else json.dumps(summary)
    rejected = runner.record("verify")["summary"].get("rejected", {})
    if rejected:
        raise ArtifactsRejectedError(rejected, runner.output_dir, markdown)
    return markdown

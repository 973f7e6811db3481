"""Wiring of the compress pipeline's stages: library calls only, one function per stage."""

import contextlib
import json
import os
import shutil
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfkdp.export._atomic import tree_size_bytes, write_json_atomic
from tfkdp.pipelines import report as report_lib
from tfkdp.pipelines.config import RESUME_DIR, STAGE_FLAGS, STAGES
from tfkdp.pipelines.state import StageRunner


def _verbose():
    # Progress bars in a terminal; one line per epoch in logs and CI.
    return 1 if sys.stdout.isatty() else 2


def _callbacks(ctx, stage):
    """TensorBoard logs of a training stage under output_dir/tb/<stage>."""
    log_dir = os.path.join(ctx.runner.output_dir, "tb", stage)
    shutil.rmtree(log_dir, ignore_errors=True)  # a rerun of the stage replaces its logs
    return [keras.callbacks.TensorBoard(log_dir=log_dir, write_graph=False, profile_batch=0)]


class Context:
    """What the stages share: flags, data, strategy, and the runner's folders."""

    def __init__(self, values, runner):
        from tfkdp import data

        self.flags = values
        self.runner = runner
        (x_train, y_train), (x_test, y_test), self.num_classes = data.load_dataset(values["dataset"])
        (self.x_train, self.y_train), (self.x_val, self.y_val) = data.validation_split(
            x_train, y_train, 0.1, seed=values["seed"]
        )
        self.x_test, self.y_test = x_test, y_test
        self.input_shape = tuple(int(d) for d in x_train.shape[1:])
        self.strategy = _strategy(values["strategy"])

    def datasets(self, subset=0):
        from tfkdp import data

        x, y = self.x_train, self.y_train
        if subset:
            x, y = x[:subset], y[:subset]
        batch = self.flags["batch_size"]
        train = data.make_dataset(x, y, batch, training=True, seed=self.flags["seed"])
        val = data.make_dataset(self.x_val, self.y_val, 512)
        return train, val

    def test_inputs(self, limit=None):
        from tfkdp import data

        x = self.x_test if limit is None else self.x_test[:limit]
        y = self.y_test if limit is None else self.y_test[:limit]
        return data.preprocess(x).numpy(), np.asarray(y)

    def path(self, stage, name):
        return os.path.join(self.runner.stage_dir(stage), name)


def _strategy(name):
    if name == "default":
        return tf.distribute.get_strategy()
    from tfkdp import runtime

    strategy = runtime.mirrored_strategy()
    logging.info("MirroredStrategy over %s", list(strategy.extended.worker_devices))
    return strategy


def _scope(ctx):
    return ctx.strategy.scope() if ctx.flags["strategy"] != "default" else contextlib.nullcontext()


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

    x, y = ctx.test_inputs()
    return {
        "accuracy": metrics.accuracy(model, x, y, batch_size=512),
        "macs": metrics.count_macs(model),
        "params": metrics.count_params(model),
    }


def _check_io(model, ctx, what):
    out = model.output_shape[-1] if hasattr(model, "output_shape") else None
    if out is not None and out != ctx.num_classes:
        raise ValueError(
            f"the {what} outputs {out} classes but dataset {ctx.flags['dataset']!r} has "
            f"{ctx.num_classes}; pass a {what} trained for this dataset"
        )
    shape = tuple(model.input_shape[1:]) if hasattr(model, "input_shape") else None
    if shape is not None and shape != ctx.input_shape:
        raise ValueError(
            f"the {what} expects inputs of shape {shape} but dataset {ctx.flags['dataset']!r} "
            f"has images of shape {ctx.input_shape}"
        )


def _teacher_path(ctx):
    record = ctx.runner.record("teacher")["summary"]
    return ctx.path("teacher", "teacher.keras") if record["trained_here"] else record["path"]


def load_teacher(ctx):
    """The teacher model of the finished teacher stage (or the user's file)."""
    from tfkdp.distill.distiller import load_teacher as load

    return load(_teacher_path(ctx), input_shape=ctx.input_shape)


def stage_teacher(ctx, work):
    from tfkdp import metrics, models
    from tfkdp.train import phases

    spec = ctx.flags["teacher"]
    if spec in models.names():
        keras.utils.set_random_seed(ctx.flags["seed"])
        with _scope(ctx):
            model = models.get(spec, input_shape=ctx.input_shape, num_classes=ctx.num_classes)
        train, val = ctx.datasets()
        training = phases.Training(
            learning_rate=ctx.flags["teacher_lr"], callbacks=tuple(_callbacks(ctx, "teacher")),
            verbose=_verbose(),
        )
        with _scope(ctx):
            # The guarded supervised phase: a NaN/inf loss stops with NonFiniteLossError.
            phases.finetune(model, train, val, ctx.flags["teacher_epochs"], training, "teacher")
        model.save(os.path.join(work, "teacher.keras"))
        return dict(_summary(model, ctx), trained_here=True, path="teacher.keras")
    from tfkdp.distill.distiller import load_teacher as load

    model = load(spec, input_shape=ctx.input_shape)
    _check_io(model, ctx, "teacher")
    if os.path.isdir(spec):
        # A SavedModel runs inference-only through TFSMLayer: its cost is not countable.
        x, y = ctx.test_inputs()
        return {
            "accuracy": metrics.accuracy(model, x, y), "macs": None, "params": None,
            "trained_here": False, "path": os.path.abspath(spec),
        }
    return dict(_summary(model, ctx), trained_here=False, path=os.path.abspath(spec))


def build_student(ctx, teacher):
    from tfkdp import models

    spec = ctx.flags["student"]
    if spec == "teacher":
        if os.path.isdir(_teacher_path(ctx)):
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
    _check_io(student, ctx, "student")
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
        verbose=_verbose(),
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
    from tfkdp.methods import Budget

    return Budget.macs(ctx.flags["target_macs_reduction"])


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
    with _scope(ctx):
        teacher = load_teacher(ctx)
        student = build_student(ctx, teacher)
        pruned = method.prune(teacher, student, train, val, _budget(ctx))
    pruned.model.save(os.path.join(work, "masked.keras"))
    with open(os.path.join(work, "plan.json"), "w") as f:
        f.write(pruned.plan.to_json())
    return {
        "plan": json.loads(pruned.plan.to_json()), "channels": pruned.record.get("channels", {}),
        "history": _jsonable_history(pruned.history), "record": pruned.record,
    }  # fmt: skip


def stage_finetune(ctx, work):
    """`Method.finetune`: the method's training of the masked student (and BN re-estimation)."""
    train, val = ctx.datasets(ctx.flags["compress_train_subset"])
    method = _method(ctx, "finetune")
    with _scope(ctx):
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
    # 1e-5 of the output scale: float32 sums in another order, nothing more.
    if diff > 1e-5 * scale:
        raise ValueError(
            f"stripped model differs from the masked model by {diff:.3g} (output scale "
            f"{scale:.3g}); refusing to continue with a model that computes something else"
        )
    small.save(os.path.join(work, "student.keras"))
    return dict(_summary(small, ctx), max_abs_diff_vs_masked=diff)


def stage_export(ctx, work):
    from tfkdp import data, export

    model = keras.saving.load_model(ctx.path("strip", "student.keras"))
    calibration = data.preprocess(ctx.x_train[:256]).numpy()
    artifacts = export.export_model(
        model, os.path.join(work, "artifacts"), formats=tuple(ctx.flags["formats"]),
        calibration=calibration,
    )
    return {"artifacts": {fmt: os.path.relpath(p, work) for fmt, p in artifacts.items()}}


def _artifacts(ctx):
    summary = ctx.runner.record("export")["summary"]
    return {fmt: os.path.join(ctx.runner.stage_dir("export"), rel)
            for fmt, rel in summary["artifacts"].items()}


def stage_verify(ctx, work):
    from tfkdp import export

    model = keras.saving.load_model(ctx.path("strip", "student.keras"))
    x, y = ctx.test_inputs(ctx.flags["verify_samples"])
    results = export.verify(model, _artifacts(ctx), x, y)
    write_json_atomic(os.path.join(work, "verify.json"), results)
    return {"results": results}


def stage_latency(ctx, work):
    from tfkdp import export

    rows = export.benchmark_latency(
        _artifacts(ctx), ctx.input_shape,
        threads=tuple(int(t) for t in ctx.flags["threads"]),
        repeat=ctx.flags["latency_repeat"],
    )
    write_json_atomic(os.path.join(work, "latency.json"), rows)
    return {"rows": rows}


def stage_report(ctx, work):
    """report.json, report.md and plots, with non-zero parameters, sizes and Performance Efficiency.

    Performance Efficiency (`tfkdp.metrics.performance_efficiency`) takes the
    teacher as the reference: for non-zero parameters and MACs its Keras
    model; for file size, gzip size and latency its float32 `tflite` export,
    converted and timed here on the first `--threads` count (and every
    other) with the student's settings. The accuracy is the student's Keras
    test accuracy for every cost.
    """
    from tfkdp import export, metrics
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
    verify = runner.record("verify")["summary"]["results"]
    latency = runner.record("latency")["summary"]["rows"]
    threads = tuple(int(t) for t in ctx.flags["threads"])

    # The teacher's reference costs (a SavedModel teacher is inference-only: none).
    reference = None
    teacher["nonzero_params"] = None
    if not os.path.isdir(_teacher_path(ctx)):
        import tempfile

        teacher_model = load_teacher(ctx)
        teacher["nonzero_params"] = metrics.count_nonzero_params(teacher_model)
        # Measured, not kept: the report folder holds files only (run() copies them out).
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            paths = export.export_model(teacher_model, scratch, formats=("tflite",))
            rows = export.benchmark_latency(
                dict(paths), ctx.input_shape, threads=threads, repeat=ctx.flags["latency_repeat"]
            )
            reference = {
                "format": "tflite", "size_bytes": tree_size_bytes(paths["tflite"]),
                "gzip_bytes": gzip_size_bytes(paths["tflite"]),
                "latency_ms_p50": {str(r["threads"]): r["p50_ms"] for r in rows},
            }  # fmt: skip
    teacher["reference_artifact"] = reference

    def efficiency(cost, reference_cost):
        if not cost or not reference_cost or not teacher.get("accuracy"):
            return None
        return metrics.performance_efficiency(
            student["accuracy"], teacher["accuracy"], cost, reference_cost
        )

    student["performance_efficiency"] = {
        "reference": "teacher",
        "nonzero_params": efficiency(student["nonzero_params"], teacher["nonzero_params"]),
        "macs": efficiency(student["macs"], teacher["macs"]),
    }
    artifacts = []
    for fmt, path in _artifacts(ctx).items():
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
        "teacher": teacher, "student": student, "artifacts": artifacts, "stages": stages,
        "flags": ctx.flags, "baselines": compress.get("baselines", []),
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
    from tfkdp import methods, models
    from tfkdp.pipelines import validate

    flags = ctx.flags
    teacher_kind = validate.check_model_spec(flags["teacher"], "teacher")
    student_kind = validate.check_model_spec(
        flags["student"], "student", allow_savedmodel=False, keywords=("teacher",)
    )
    method = _method(ctx)  # the method's own options are checked here, before any training
    if not getattr(method, "prunes", True):
        return
    method.check_budget(methods.Budget.macs(flags["target_macs_reduction"]))
    spec, kind = (flags["teacher"], teacher_kind) if student_kind == "keyword" else (
        flags["student"], student_kind
    )
    if kind == "zoo":
        architecture = models.get(spec, input_shape=ctx.input_shape, num_classes=ctx.num_classes)
    elif os.path.isdir(spec):
        return  # a SavedModel cannot be the student; build_student says so
    else:
        architecture = validate.check_keras_file(spec, "teacher" if student_kind == "keyword" else "student")
    validate.check_budget_reachable(architecture, flags["target_macs_reduction"], flags["round_to"])


def run(values, restart=False):
    """Runs (or resumes) every stage; returns the report as Markdown."""
    output_dir = values["output_dir"]
    flags_only = {k: v for k, v in values.items() if k != "output_dir"}
    runner = StageRunner(output_dir, flags_only, STAGE_FLAGS, restart=restart)
    write_json_atomic(os.path.join(runner.output_dir, "flags.json"), values)
    ctx = Context(flags_only, runner)  # loads and checks the data (NaN/inf, shapes, labels)
    preflight(ctx)
    for index, stage in enumerate(STAGES, 1):
        was_done = runner.done(stage)
        summary = runner.run(stage, lambda work, s=stage: _STAGE_FNS[s](ctx, work))
        # The stage is recorded: the method's resumable state inside it is spent.
        shutil.rmtree(os.path.join(runner.output_dir, RESUME_DIR, stage), ignore_errors=True)
        seconds = runner.record(stage)["seconds"]
        note = "resumed: finished earlier" if was_done else f"{seconds:.1f} s"
        print(f"[{index}/{len(STAGES)}] {stage:<9} done ({note})", flush=True)
    report_dir = runner.stage_dir("report")
    for name in os.listdir(report_dir):
        shutil.copy2(os.path.join(report_dir, name), os.path.join(runner.output_dir, name))
    return summary["markdown"] if isinstance(summary, dict) and "markdown" in summary else json.dumps(summary)

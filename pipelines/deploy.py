"""The compress pipeline's deployment stages: export, verify (rejecting what fails), latency.

Each stage is a function `stage_<name>(ctx, work)` of a `context.Context` and
the stage's temporary folder, returning the stage's summary (`state.StageRunner`
renames the folder into place).
"""

import os
import shutil

import keras
from absl import logging

from tfkdp.export._atomic import write_bytes_atomic, write_json_atomic
from tfkdp.pipelines.context import baked, load_teacher, teacher_path

__all__ = [
    "CALIBRATION_SAMPLES", "REJECTED_DIR", "ArtifactsRejectedError", "exported_artifacts",
    "restore_rejected", "stage_export", "stage_latency", "stage_verify", "verified_artifacts",
]  # fmt: skip


# Training images that calibrate tflite_int8's activation ranges (fewer if the
# training set is smaller). Full-integer quantisation takes each activation's
# range from min/max over these samples: a few hundred real images cover every
# class (50 each on 10 classes) and the ranges stop moving; TFLite suggests
# 100-500. The same count as tfkdp-export's --calibration_samples; the
# training order is random (`Context.train_inputs`), so the first N are a
# random draw.
CALIBRATION_SAMPLES = 500


def stage_export(ctx, work):
    from tfkdp import export

    model = keras.saving.load_model(ctx.path("strip", "student.keras"))
    # With --bake_preprocessing the artifacts take raw pixels: so does their calibration.
    calibration = ctx.train_inputs(CALIBRATION_SAMPLES, raw=baked(ctx) is not None)
    artifacts = export.export_model(
        model, os.path.join(work, "artifacts"), formats=tuple(ctx.flags["formats"]),
        calibration=calibration, bake_scaling=baked(ctx),
    )
    return {"artifacts": {fmt: os.path.relpath(p, work) for fmt, p in artifacts.items()},
            "calibration_samples": int(len(calibration)), "bake_scaling": baked(ctx)}


def exported_artifacts(ctx):
    summary = ctx.runner.record("export")["summary"]
    return {fmt: os.path.join(ctx.runner.stage_dir("export"), rel)
            for fmt, rel in summary["artifacts"].items()}


# Folder, inside the export stage's folder, of the artifacts that failed
# verification, each with `<file name>.reason.txt` beside it.
REJECTED_DIR = "rejected"


class ArtifactsRejectedError(RuntimeError):
    """Some exported artifacts failed verification; the report covers the others.

    `run` raises it after report.json, report.md and the plots are written,
    so the report of the passing artifacts exists when it is caught.

    Attributes:
        rejected: `{format: {"path", "reason", "short"}}`, paths relative to
            `output_dir`.
        output_dir: the run's folder (report.md and report.json are in it).
        markdown: the report as Markdown (what `run` returns on success).
    """

    def __init__(self, rejected, output_dir, markdown):
        self.rejected = dict(rejected)
        self.output_dir = output_dir
        self.markdown = markdown
        details = "; ".join(f"{fmt} ({entry['short']})" for fmt, entry in self.rejected.items())
        super().__init__(
            f"{len(self.rejected)} artifact(s) failed verification: {details}. Moved with their "
            f"reasons to {os.path.join(output_dir, 'export', REJECTED_DIR)}; "
            f"{os.path.join(output_dir, 'report.md')} covers the ones that passed"
        )


def rejected_dir(ctx):
    return os.path.join(ctx.runner.stage_dir("export"), REJECTED_DIR)


def restore_rejected(ctx):
    """Puts back what an unfinished verify stage moved out, so a rerun checks every artifact."""
    rejected = rejected_dir(ctx)
    if not os.path.isdir(rejected):
        return
    for path in exported_artifacts(ctx).values():
        moved = os.path.join(rejected, os.path.basename(path))
        if not os.path.exists(path) and os.path.exists(moved):
            os.replace(moved, path)
    shutil.rmtree(rejected)


def short_reason(result):
    """One clause per failed check: `top1_agreement 0.875 < 0.98 (n=32)`."""
    if result.get("error"):
        error = result["error"]
        return error if len(error) <= 120 else error[:117] + "..."
    parts = [
        f"{c['metric']} {c['measured']:.4g} {'>' if c['metric'] == 'max_abs_diff' else '<'} "
        f"{c['allowed']:.4g}"
        for c in result.get("checks", []) if not c["passed"]
    ]
    return f"{', '.join(parts)} (n={result.get('n')})"


def stage_verify(ctx, work):
    """Every artifact against the Keras student on the first `--verify_samples` test images.

    An artifact that fails a check (or does not run on its runtime) is moved
    to `export/rejected/` with `<file>.reason.txt` beside it; the latency and
    report stages see only the ones that passed, and `run` raises
    `ArtifactsRejectedError` once the report is written. With
    `--strict_verify` a failure stops the run here (`VerificationError`) and
    nothing is moved.
    """
    from tfkdp import export

    restore_rejected(ctx)  # a rerun of this stage starts from what export wrote
    model = keras.saving.load_model(ctx.path("strip", "student.keras"))
    # Baked artifacts get raw pixels; the Keras student gets them scaled (inside verify).
    x, y = ctx.test_inputs(ctx.flags["verify_samples"], raw=baked(ctx) is not None)
    artifacts = exported_artifacts(ctx)
    try:
        results = export.verify(model, artifacts, x, y, bake_scaling=baked(ctx))
    except export.VerificationError as error:
        if ctx.flags.get("strict_verify", False):
            raise
        results = error.results
    rejected = {}
    for fmt, result in results.items():
        if result["passed"]:
            continue
        target = os.path.join(rejected_dir(ctx), os.path.basename(artifacts[fmt]))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        reason = "\n".join(result["failures"])
        write_bytes_atomic(target + ".reason.txt", (reason + "\n").encode("utf-8"))
        os.replace(artifacts[fmt], target)
        rejected[fmt] = {
            "path": os.path.relpath(target, ctx.runner.output_dir), "reason": reason,
            "short": short_reason(result),
        }
        logging.warning("rejected %s (moved to %s): %s", fmt, target, reason)
    write_json_atomic(os.path.join(work, "verify.json"), results)
    return {"results": results, "rejected": rejected}


def verified_artifacts(ctx):
    """`{format: path}` of the exported artifacts that passed the verify stage."""
    rejected = ctx.runner.record("verify")["summary"].get("rejected", {})
    return {fmt: path for fmt, path in exported_artifacts(ctx).items() if fmt not in rejected}


def stage_latency(ctx, work):
    """Times the verified artifacts and, in the same interleaved blocks, the teacher's float32 tflite.

    The teacher (unless it is a SavedModel, which is inference-only) is
    converted to `latency/teacher/model.tflite` (and `model.onnx` when the
    student has an onnx artifact) and timed as `teacher:tflite` next to the
    student's artifacts, so a busy machine biases neither side; its rows carry
    `label: "teacher"`.
    """
    from tfkdp import export

    artifacts = dict(verified_artifacts(ctx))
    if not artifacts:
        logging.warning("no artifact passed verification: nothing to time")
    teacher_artifact = None
    if artifacts and not os.path.isdir(teacher_path(ctx)):
        formats = ("tflite", "onnx") if "onnx" in artifacts else ("tflite",)
        paths = export.export_model(load_teacher(ctx), os.path.join(work, "teacher"),
                                    formats=formats, bake_scaling=baked(ctx))  # fmt: skip
        teacher_artifact = os.path.relpath(paths["tflite"], work)  # the stage folder is renamed
        for fmt in formats:
            artifacts[f"teacher:{fmt}"] = paths[fmt]
    rows = export.benchmark_latency(
        artifacts, ctx.input_shape,
        threads=tuple(int(t) for t in ctx.flags["threads"]),
        repeat=ctx.flags["latency_repeat"],
        input_scaling=ctx.scaling, bake_scaling=baked(ctx),
    ) if artifacts else []
    for row in rows:
        if row.get("label") == "teacher":  # where it will be once the stage folder is in place
            row["path"] = os.path.join(ctx.runner.stage_dir("latency"), os.path.relpath(row["path"], work))
    write_json_atomic(os.path.join(work, "latency.json"), rows)
    return {"rows": rows, "teacher_artifact": teacher_artifact}

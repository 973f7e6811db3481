"""tfkdp-compress: teacher → compress → finetune → strip → export → verify → latency → report.

Each stage writes its outputs atomically and is recorded in
`<output_dir>/state.json`; rerunning the same command resumes after the last
finished stage. Defaults are the demo: Fashion-MNIST, a resnet20 teacher
trained first, KDP at 50 % MAC reduction, every export format.

Example:
    python -m tfkdp.pipelines.compress --output_dir=runs/demo
    python -m tfkdp.pipelines.compress --flagfile=my.flags --restart
"""

import json
import os
import sys
import time

from absl import app, flags

from tfkdp.pipelines.config import (
    ALL_FORMATS,
    CRITERIA,
    MIXED_PRECISION,
    STAGE_FLAGS,
    STRATEGIES,
)

FLAGS = flags.FLAGS

flags.DEFINE_string(
    "teacher", "resnet20",
    "A trained teacher (.keras/.h5 file or SavedModel folder), or a zoo model name to train first.",
)
flags.DEFINE_string(
    "student", "teacher",
    "'teacher' (compress a copy of the teacher), a zoo model name, or a .keras/.h5 path.",
)
flags.DEFINE_string(
    "dataset", "fashion_mnist",
    "fashion_mnist, npz:PATH, cifar10:PATH, cifar100:PATH (the python-pickle folders) or dir:PATH "
    "(image class folders, streamed; optional train/ val/ test/ sub-folders).",
)
flags.DEFINE_list(
    "image_size", ["28", "28"],
    "dir: datasets with a zoo teacher trained here: HEIGHT,WIDTH images are resized to "
    "(a teacher file's input size wins).",
)
flags.DEFINE_enum(
    "color_mode", "grayscale", ("grayscale", "rgb"),
    "dir: datasets with a zoo teacher trained here: 1 or 3 channels (a teacher file's wins).",
)
flags.DEFINE_string(
    "method", "kdp",
    "Compression method: a name registered in tfkdp.methods (tfkdp.methods.names(); "
    "built in: kdp, prune_only, kd_only, ddsl, mskd, pdc, weight, cascade), or several "
    "comma-separated, or 'all': one teacher, every method under output_dir/<method>/, and "
    "comparison.md/json with Pareto plots (see README, 'Which recipe').",
)
flags.DEFINE_list(
    "seeds", [],
    "Several seeds, e.g. 0,1,2: every --method runs once per seed (output_dir/<method>/seed<k>/) "
    "and the comparison reports mean and spread. Empty: --seed alone.",
)
flags.DEFINE_enum(
    "deploy_format", "tflite", ("tflite", "tflite_f16", "tflite_dynamic", "tflite_int8", "tflite_sparse"),
    "Comparison of several methods: the export format whose file size and LiteRT latency are compared.",
)
flags.DEFINE_float("target_macs_reduction", 0.5, "Share of the student's MACs to remove, in (0, 1).")
flags.DEFINE_float(
    "target_latency_ms", None,
    "A latency budget instead of the MAC budget: predicted ms per image (batch 1) on "
    "--latency_runtime with --latency_threads (a cost model measured on that runtime).",
)
flags.DEFINE_float(
    "target_latency_reduction", None,
    "A latency budget as a share of the student's predicted latency to remove, in (0, 1), on "
    "--latency_runtime with --latency_threads: unlike --target_latency_ms it does not depend on how "
    "fast the machine runs today.",
)
flags.DEFINE_enum("latency_runtime", "litert", ("litert", "onnxruntime"),
                  "Runtime of the latency budget's cost model.")  # fmt: skip
flags.DEFINE_integer("latency_threads", 1, "Threads of the latency budget's runtime.")
flags.DEFINE_enum("criterion", "l1", CRITERIA, "Channel importance criterion.")
flags.DEFINE_string(
    "round_to", "auto",
    "Kept channel counts are multiples of this: a positive integer, or 'auto' for the alignment "
    "the --latency_runtime rewards (measured once per machine, cached).",
)
flags.DEFINE_integer("teacher_epochs", 4, "Epochs to train a zoo teacher.")
flags.DEFINE_integer("compress_epochs", 2, "Epochs of the compression stage (ADMM+KD, or KD).")
flags.DEFINE_integer("finetune_epochs", 1, "Epochs of fine-tuning after stripping.")
flags.DEFINE_integer(
    "batch_size", 128,
    "Global batch size (split over the replicas; --lr is the learning rate of this global batch).",
)
flags.DEFINE_float("teacher_lr", 0.1, "Peak learning rate of teacher training.")
flags.DEFINE_float("lr", 0.05, "Peak learning rate of compression and fine-tuning.")
flags.DEFINE_float("temperature", 4.0, "Soft-target KD temperature.")
flags.DEFINE_integer(
    "compress_train_subset", 0,
    "Use only the first N training images in compress/finetune (0 = all).",
)
flags.DEFINE_list("formats", list(ALL_FORMATS), f"Export formats, from {ALL_FORMATS}.")
flags.DEFINE_string(
    "input_scaling", "unit",
    "How 0-255 pixels become model inputs, for training, verification, calibration and latency "
    "alike (tfkdp.scaling): unit ([0, 1]), raw (0-255 floats: models that rescale inside, e.g. "
    "EfficientNet), symmetric ([-1, 1], MobileNetV2), caffe (BGR, ImageNet means subtracted, "
    "ResNet50) or torch (ImageNet mean/std).",
)
flags.DEFINE_boolean(
    "bake_preprocessing", False,
    "Put --input_scaling into the exported models (a layer in front of the student): every "
    "artifact takes raw 0-255 images, tflite_int8 as uint8.",
)
flags.DEFINE_list("threads", ["1"], "Thread counts for latency measurement.")
flags.DEFINE_integer(
    "verify_samples", 1000,
    "Test images used to verify artifacts (>= 100 so one disagreement cannot fail the 98 % "
    "top-1 bar of the int8 formats on its own; fewer is logged as a warning).",
)
flags.DEFINE_boolean(
    "strict_verify", False,
    "Stop at the verify stage when an artifact fails (no report). Off: failing artifacts are "
    "moved to export/rejected/, the rest are timed and reported, and the run exits with 1.",
)
flags.DEFINE_integer("latency_repeat", 200, "Timed runs per artifact and runtime.")
flags.DEFINE_string("output_dir", "runs/compress", "Where stages, artifacts and the report go.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling and augmentation.")
flags.DEFINE_enum(
    "strategy", "default", STRATEGIES,
    "tf.distribute strategy for training: default (one device), mirrored (this host's GPUs or "
    "CPUs) or multiworker (several hosts, each with its TF_CONFIG; see the README).",
)
flags.DEFINE_enum(
    "mixed_precision", "none", MIXED_PRECISION,
    "Keras dtype policy of training: none (float32), mixed_float16 (GPUs with tensor cores) or "
    "mixed_bfloat16.",
)
flags.DEFINE_boolean("restart", False, "Discard finished stages in output_dir and start over.")

# Method-specific flags: each method's `pipeline_options` reads its own (see README).
flags.DEFINE_float(
    "admm_rho_initial", None,
    "kdp, ddsl: ADMM ρ at the start of the ADMM phase (> 0; default: the method's, kdp 0.5 per "
    "unit of its mean-normalised penalty, ddsl 0.001).",
)
flags.DEFINE_float(
    "admm_rho_final", None,
    "kdp, ddsl: ADMM ρ reached after 3/4 of the ADMM phase (> 0; default: kdp 25, ddsl 0.05).",
)
flags.DEFINE_integer("dean_every", 10, "ddsl: optimizer steps between the dean's meta-updates.")
flags.DEFINE_float("dean_lr", 0.05, "ddsl: learning rate of the dean's parameters.")
flags.DEFINE_float("dean_distill_max", 2.0, "ddsl: upper bound of the distillation weight.")
flags.DEFINE_float("dean_sparsity_max", 2.0, "ddsl: upper bound of the sparsity weight.")
flags.DEFINE_list(
    "mskd_criteria", ["l1", "l2", "bn_gamma", "taylor", "fpgm", "hessian"],
    "mskd: criteria proposing candidate sub-networks.",
)
flags.DEFINE_list("mskd_allocations", ["global", "uniform"], "mskd: allocations of the candidates.")
flags.DEFINE_integer("mskd_top_k", 3, "mskd: candidates given a short KD before the final choice.")
flags.DEFINE_integer(
    "mskd_select_steps", 0, "mskd: KD steps per top-k candidate (0: a tenth of an epoch)."
)
flags.DEFINE_string(
    "pdc_epsilon", "auto",
    "pdc: strength of the centripetal pull, a number > 0, or 'auto' (sized to the phase so the "
    "clusters close; the value used is in the report).",
)
flags.DEFINE_enum(
    "weight_order", "sequential", ("sequential", "joint"),
    "weight: KD → prune → KD fine-tune (sequential) or prune during KD (joint).",
)
flags.DEFINE_float("target_sparsity", 0.5, "weight: share of the prunable weights set to zero.")
flags.DEFINE_integer(
    "cascade_num_tas", 1, "cascade: teaching assistants between the student and the unpruned model."
)
flags.DEFINE_list(
    "cascade_levels", [], "cascade: MAC reductions of the TAs (default: evenly spaced below the budget)."
)
flags.DEFINE_integer("cascade_stage2_epochs", 1, "cascade: epochs of stage 2 (KD with teacher swaps).")


flags.register_validator(
    "target_macs_reduction", lambda v: 0.0 < v < 1.0,
    message="--target_macs_reduction must lie strictly between 0 and 1",
)
flags.register_validator(
    "formats", lambda v: bool(v) and all(f in ALL_FORMATS for f in v),
    message=f"--formats must be a non-empty comma-separated subset of {','.join(ALL_FORMATS)}",
)
flags.register_validator(
    "image_size", lambda v: len(v) == 2 and all(d.isdigit() and int(d) > 0 for d in v),
    message="--image_size must be HEIGHT,WIDTH with two positive integers, e.g. 32,32",
)
flags.register_validator(
    "threads", lambda v: bool(v) and all(t.isdigit() and int(t) > 0 for t in v),
    message="--threads must be a comma-separated list of positive integers, e.g. 1,2",
)
for _name in ("teacher_epochs", "compress_epochs", "batch_size", "verify_samples",
              "latency_repeat"):
    flags.register_validator(_name, lambda v: v >= 1, message=f"--{_name} must be >= 1")
flags.register_validator("finetune_epochs", lambda v: v >= 0, message="--finetune_epochs must be >= 0")
flags.register_validator(
    "compress_train_subset", lambda v: v >= 0, message="--compress_train_subset must be >= 0"
)

def _known_method(spec):
    # Imported at validation, not at flag definition, so --help answers without TensorFlow.
    from tfkdp import methods

    for name in str(spec).split(","):
        name = name.strip()
        if name and name != "all" and name not in methods.names():
            raise flags.ValidationError(
                f"--method={name!r} is not a registered method; valid: <{'|'.join(methods.names())}>, "
                "several comma-separated, or 'all'"
            )
    return True


flags.register_validator("method", _known_method)
flags.register_validator(
    "round_to", lambda v: v.strip().lower() == "auto" or (v.strip().isdigit() and int(v) >= 1),
    message="--round_to must be 'auto' or a positive integer, e.g. 8",
)


def _known_scaling(name):
    from tfkdp import scaling

    if name not in scaling.names():
        raise flags.ValidationError(
            f"--input_scaling={name!r} is not a known input scaling; valid: <{'|'.join(scaling.names())}>"
        )
    return True


flags.register_validator("input_scaling", _known_scaling)


def resolved_flags():
    """The values of this module's flags (what state.json and flags.json store)."""
    names = sorted({f for stage_flags in STAGE_FLAGS.values() for f in stage_flags})
    return {name: FLAGS[name].value for name in names}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}")
    # Imported here so `--help` and flag errors answer without loading TensorFlow.
    from tfkdp.export import VerificationError
    from tfkdp.pipelines import compare, workflow

    non_finite_error = _non_finite_loss_error()

    values = resolved_flags()
    values["output_dir"] = FLAGS.output_dir
    start = time.time()
    values.update(seeds=list(FLAGS.seeds), deploy_format=FLAGS.deploy_format)
    try:
        comparing = compare.is_comparison(values)
    except ValueError as error:
        print(f"tfkdp-compress: error: {error}", file=sys.stderr)
        return 2
    if comparing:
        return _compare(values, start)
    del values["seeds"], values["deploy_format"]
    # One line on stderr and no traceback (absl's logging.error would add a second line).
    try:
        report_md = workflow.run(values, restart=FLAGS.restart)
    except workflow.ArtifactsRejectedError as error:
        # The report of the passing artifacts is complete: show it, then fail.
        print(error.markdown)
        print(f"tfkdp-compress: error: {error}", file=sys.stderr)
        return 1
    except VerificationError as error:  # --strict_verify: the run stops at the verify stage
        print(f"tfkdp-compress: error: {strict_verify_message(error, FLAGS.output_dir)}",
              file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as error:
        print(f"tfkdp-compress: error: {error}", file=sys.stderr)
        return 2
    except non_finite_error as error:
        message = diverged_message(error, FLAGS.output_dir)
        print(f"tfkdp-compress: error: {message}", file=sys.stderr)
        return 1
    print(report_md)
    print(f"Finished in {time.time() - start:.0f} s; outputs in {os.path.abspath(FLAGS.output_dir)}")
    return 0


def _compare(values, start):
    """Several methods or seeds: `tfkdp.pipelines.compare`; exit 1 when a run failed."""
    from tfkdp.pipelines import compare

    try:
        markdown, failed = compare.run(values, restart=FLAGS.restart)
    except (ValueError, FileNotFoundError) as error:
        print(f"tfkdp-compress: error: {error}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"Finished in {time.time() - start:.0f} s; outputs in {os.path.abspath(FLAGS.output_dir)}")
    if failed:
        print(f"tfkdp-compress: error: {len(failed)} run(s) failed: {', '.join(failed)} (errors in "
              f"{os.path.join(os.path.abspath(FLAGS.output_dir), 'comparison.md')})", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _non_finite_loss_error():
    """The library's NaN/inf training error class (its home moved to tfkdp.train.guard)."""
    try:
        from tfkdp.train.guard import NonFiniteLossError
    except ImportError:
        from tfkdp.methods.kdp import NonFiniteLossError
    return NonFiniteLossError


def strict_verify_message(error, output_dir):
    """One line for a failed check under --strict_verify: the failures and how to get a report."""
    return (
        f"artifact verification failed (--strict_verify): {'; '.join(error.failures)}. "
        f"The stages up to export are kept in {os.path.abspath(output_dir)}; rerun without "
        "--strict_verify to reject the failing artifacts and report the others."
    )


def diverged_message(error, output_dir):
    """One line for a NaN/inf loss: which stage, what is kept, what to try."""
    from tfkdp.pipelines.config import STAGES

    completed = {}
    try:
        with open(os.path.join(output_dir, "state.json"), encoding="utf-8") as f:
            completed = json.load(f).get("completed", {})
    except (OSError, ValueError):
        pass
    stage = next((s for s in STAGES if s not in completed), "?")
    kept = [s for s in STAGES if s in completed]
    lr_flag = "--teacher_lr" if stage == "teacher" else "--lr"
    detail = " ".join(str(error).split())  # one line, whatever the library wrote
    return (
        f"training diverged (loss became NaN/inf) in stage {stage!r}: {detail}. "
        f"Finished stages {kept or 'none'} are kept in {os.path.abspath(output_dir)}; "
        f"the {stage!r} stage wrote nothing and rerunning resumes there. "
        f"Try a lower {lr_flag}, or check the data for NaN/inf."
    )


def run():
    """Console-script entry point (`tfkdp-compress`).

    oneDNN's custom operations are turned off first (TensorFlow reads the
    switch once, when imported), unless `TFKDP_ONEDNN=1` or
    `TF_ENABLE_ONEDNN_OPTS` is set: see `tfkdp.onednn`.
    """
    from tfkdp.onednn import disable_for_entry_point

    disable_for_entry_point()
    app.run(main)


if __name__ == "__main__":
    run()

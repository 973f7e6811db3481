"""A failing artifact is rejected, the others are timed and reported, and the run exits 1.

One tiny pipeline run (untrained resnet8 teacher file, one compress epoch, no
fine-tune, formats tflite + tflite_dynamic) serves every test: first with
`strict_verify` (stops at verify, no report), then resumed without it (rejects,
reports), then resumed through the CLI's `main` (nothing reruns, exit 1). The
failure is forced by rolling `tflite_dynamic`'s outputs by one class inside
verification, so its top-1 agreement is measured (about 0) against the real
98 % bar.
"""

import importlib
import json
import os
import shutil
import types

import numpy as np
import pytest
from test_pipeline import _values  # tests/ is on sys.path (rootdir-relative, no package)

from tfkdp.export import VerificationError
from tfkdp.pipelines import deploy, workflow
from tfkdp.pipelines.state import StageRunner

# The module, not `tfkdp.export.verify` the function that the package re-exports.
verify_module = importlib.import_module("tfkdp.export.verify")

FORMATS = ["tflite", "tflite_dynamic"]
BROKEN = "tflite_dynamic"


def _flipping_open_runner(real_open):
    def open_runner(fmt, path, num_threads=None):
        runner = real_open(fmt, path, num_threads)
        if fmt != BROKEN:
            return runner

        class Flipped:
            runtime = runner.runtime

            def __call__(self, x):
                return np.roll(runner(x), 1, axis=-1)  # every argmax moves to the next class

        return Flipped()

    return open_runner


def _recording(calls, real):
    return {
        name: (lambda ctx, work, name=name, fn=fn: (calls.append(name), fn(ctx, work))[1])
        for name, fn in real.items()
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher):
    """The strict run, then the non-strict resume, with tflite_dynamic broken in both."""
    tmp = tmp_path_factory.mktemp("rejects")
    values = _values(tmp, teacher=tiny_teacher, formats=FORMATS, finetune_epochs=0,
                     compress_epochs=1, strict_verify=True)  # fmt: skip
    out = values["output_dir"]
    seen = {"strict_calls": [], "calls": [], "warnings": []}
    real_warning = verify_module.logging.warning
    real_stages = dict(workflow._STAGE_FNS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verify_module, "open_runner", _flipping_open_runner(verify_module.open_runner))
        mp.setattr(verify_module.logging, "warning",
                   lambda msg, *args: (seen["warnings"].append(msg % args), real_warning(msg, *args)))
        for name, fn in _recording(seen["strict_calls"], real_stages).items():
            mp.setitem(workflow._STAGE_FNS, name, fn)
        with pytest.raises(VerificationError) as strict:
            workflow.run(values)
        seen["strict_error"] = strict.value
        seen["strict_listing"] = sorted(os.listdir(out))
        seen["strict_artifacts"] = sorted(os.listdir(os.path.join(out, "export", "artifacts")))
        seen["strict_export"] = sorted(os.listdir(os.path.join(out, "export")))

        values = dict(values, strict_verify=False)
        for name, fn in _recording(seen["calls"], real_stages).items():
            mp.setitem(workflow._STAGE_FNS, name, fn)
        with pytest.raises(workflow.ArtifactsRejectedError) as rejected:
            workflow.run(values)
        seen["error"] = rejected.value
    with open(os.path.join(out, "report.json")) as f:
        seen["report"] = json.load(f)
    seen["values"], seen["out"] = values, out
    return seen


def test_strict_verify_stops_at_the_failing_artifact_with_no_report(run):
    assert run["strict_calls"] == ["teacher", "compress", "finetune", "strip", "export", "verify"]
    assert any(f.startswith(f"{BROKEN} ") for f in run["strict_error"].failures)
    assert not any(f.startswith("tflite ") for f in run["strict_error"].failures)
    # Nothing after verify ran, nothing was moved, no report.
    assert "report.json" not in run["strict_listing"] and "latency" not in run["strict_listing"]
    assert "verify" not in run["strict_listing"]
    assert run["strict_artifacts"] == ["model.tflite", "model_dynamic.tflite"]
    assert workflow.REJECTED_DIR not in run["strict_export"]


def test_failing_artifact_is_moved_to_rejected_with_its_reason(run):
    out = run["out"]
    moved = os.path.join(out, "export", workflow.REJECTED_DIR, "model_dynamic.tflite")
    assert os.path.isfile(moved)
    assert not os.path.exists(os.path.join(out, "export", "artifacts", "model_dynamic.tflite"))
    assert os.path.isfile(os.path.join(out, "export", "artifacts", "model.tflite"))
    with open(moved + ".reason.txt") as f:
        reason = f.read()
    assert reason.startswith(f"{BROKEN} (") and "top1_agreement = " in reason
    assert "allowed >= 0.98" in reason and "n=32" in reason
    # 32 test images: the reason says one disagreement weighs 3.1 % and asks for >= 100.
    assert "3.1%" in reason and ">= 100 images" in reason
    # the resumed verify stage ran; the strict run's finished stages did not rerun
    assert run["calls"] == ["verify", "latency", "report"]


def test_report_lists_the_rejected_artifact_and_times_only_the_others(run):
    report = run["report"]
    assert [a["format"] for a in report["artifacts"]] == ["tflite"]
    passed = report["artifacts"][0]
    assert passed["top1_agreement"] == 1.0 and passed["latency_ms_p50"] > 0
    assert [r["format"] for r in report["rejected"]] == [BROKEN]
    rejected = report["rejected"][0]
    assert rejected["path"] == os.path.join("export", workflow.REJECTED_DIR, "model_dynamic.tflite")
    assert rejected["n"] == 32 and rejected["runtime"] == "litert"
    # Rolled logits: the argmax agrees with Keras only where Keras' top two are tied.
    assert rejected["top1_agreement"] < 0.5
    [check] = rejected["failed_checks"]
    assert check["metric"] == "top1_agreement" and check["allowed"] == 0.98
    assert check["measured"] == rejected["top1_agreement"]
    runner = StageRunner(run["out"], {k: v for k, v in run["values"].items() if k != "output_dir"},
                         workflow.STAGE_FLAGS)  # fmt: skip
    assert {r["format"] for r in runner.record("latency")["summary"]["rows"]} == {"tflite"}
    with open(os.path.join(run["out"], "report.md")) as f:
        markdown = f.read()
    section = markdown.split("## Rejected artifacts", 1)[1]
    assert f"| {BROKEN} | litert | 32 | top1_agreement | {check['measured']:.4g} | >= 0.98 |" in section
    assert markdown == run["error"].markdown


def test_run_raises_after_the_report_with_one_line_naming_the_format(run):
    error = run["error"]
    assert isinstance(error, RuntimeError) and set(error.rejected) == {BROKEN}
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"1 artifact(s) failed verification: {BROKEN} (top1_agreement ")
    assert "< 0.98 (n=32)" in message and "report.md" in message


def test_few_verification_images_are_warned_about(run):
    assert any(w.startswith(f"{BROKEN}: top-1 agreement >= 0.98 checked on only 32 samples")
               for w in run["warnings"])  # fmt: skip
    # tflite is checked by max |diff|, not top-1: no warning for it
    assert not any(w.startswith("tflite:") for w in run["warnings"])


def test_default_sample_counts_keep_one_disagreement_from_failing_the_bar(run):
    from tfkdp.pipelines import compress

    bar = verify_module.DEFAULT_TOLERANCES["tflite_int8"]["min_top1_agreement"]
    assert verify_module.min_agreement_samples(bar) == 100
    assert verify_module.min_agreement_samples(1.0) is None
    assert compress.FLAGS["verify_samples"].default >= verify_module.min_agreement_samples(bar)
    assert workflow.CALIBRATION_SAMPLES == 500
    runner = StageRunner(run["out"], {k: v for k, v in run["values"].items() if k != "output_dir"},
                         workflow.STAGE_FLAGS)  # fmt: skip
    # 96 training images, 10 % held out for validation: all 86 calibrate (fewer than 500)
    assert runner.record("export")["summary"]["calibration_samples"] == 86


def test_unfinished_verify_stage_puts_rejected_artifacts_back(run, tmp_path):
    # As if the verify stage was killed after moving the artifact, before it was recorded.
    out = str(tmp_path / "copy")
    shutil.copytree(run["out"], out)
    flags = {k: v for k, v in run["values"].items() if k != "output_dir"}
    ctx = types.SimpleNamespace(runner=StageRunner(out, flags, workflow.STAGE_FLAGS))
    deploy.restore_rejected(ctx)
    artifacts = sorted(os.listdir(os.path.join(out, "export", "artifacts")))
    assert artifacts == ["model.tflite", "model_dynamic.tflite"]
    assert not os.path.exists(os.path.join(out, "export", workflow.REJECTED_DIR))


def test_cli_resumes_without_reverifying_and_exits_1_with_one_line(run, capsys, monkeypatch):
    from tfkdp.pipelines import compress

    calls = []
    for name, fn in _recording(calls, dict(workflow._STAGE_FNS)).items():
        monkeypatch.setitem(workflow._STAGE_FNS, name, fn)
    argv = ["tfkdp-compress"]
    for name, value in run["values"].items():
        if value is None:
            continue  # the flag's default (None) is the value
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        argv.append(f"--{name}={value}")
    compress.FLAGS(argv)
    try:
        code = compress.main(["tfkdp-compress"])
    finally:
        compress.FLAGS.unparse_flags()
    captured = capsys.readouterr()
    # The verification is no longer broken: a rerun of verify would pass. None ran.
    assert calls == []
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("tfkdp-compress: error:")]
    assert len(errors) == 1 and BROKEN in errors[0] and "failed verification" in errors[0]
    assert "Traceback" not in captured.err
    assert "## Rejected artifacts" in captured.out  # the report is printed before failing


def test_an_artifact_that_does_not_run_fails_and_the_others_are_still_checked(run, tmp_path):
    import keras

    from tfkdp import export

    out = run["out"]
    model = keras.saving.load_model(os.path.join(out, "strip", "student.keras"))
    broken = tmp_path / "model_dynamic.tflite"
    broken.write_bytes(b"not a flatbuffer")
    x = np.random.default_rng(0).uniform(0, 1, (8, 12, 12, 1)).astype("float32")
    good = os.path.join(out, "export", "artifacts", "model.tflite")
    with pytest.raises(VerificationError) as info:
        export.verify(model, {BROKEN: str(broken), "tflite": good}, x)
    results = info.value.results
    assert results["tflite"]["passed"] is True
    assert results[BROKEN]["passed"] is False
    assert results[BROKEN]["error"].startswith("does not run: ")
    assert info.value.failures == results[BROKEN]["failures"]

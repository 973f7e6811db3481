"""End-to-end tests of `python -m tfkdp.pipelines.compress` on tiny generated data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfkdp.pipelines import workflow
from tfkdp.pipelines.state import FlagMismatchError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_npz(path, n_train=96, n_test=32, classes=3, size=12):
    """Structured uint8 images: class c has a bright vertical band at c·size/classes."""
    rng = np.random.default_rng(0)

    def make(n):
        y = np.arange(n) % classes
        x = rng.integers(0, 50, size=(n, size, size), dtype=np.uint8)
        band = size // classes
        for i, label in enumerate(y):
            x[i, :, label * band : (label + 1) * band] += 180
        return x, y.astype(np.int64)

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def _values(tmp_path, **overrides):
    values = {
        "teacher": "resnet8", "student": "teacher", "dataset": f"npz:{_tiny_npz(tmp_path / 'd.npz')}",
        "method": "kdp", "target_macs_reduction": 0.5, "criterion": "l1", "round_to": 2,
        "target_latency_ms": None, "latency_runtime": "litert", "latency_threads": 1,
        "teacher_epochs": 3, "compress_epochs": 1, "finetune_epochs": 1, "batch_size": 16,
        "teacher_lr": 0.05, "lr": 0.02, "temperature": 4.0, "compress_train_subset": 0,
        "formats": ["tflite", "onnx"], "threads": ["1"], "verify_samples": 32,
        "strict_verify": False, "latency_repeat": 5, "seed": 0, "strategy": "default",
        "image_size": ["28", "28"], "color_mode": "grayscale",
        "input_scaling": "unit", "bake_preprocessing": False,
        "output_dir": str(tmp_path / "out"),
        # the method flags' defaults (pipelines/compress.py)
        "dean_every": 10, "dean_lr": 0.05, "dean_distill_max": 2.0, "dean_sparsity_max": 2.0,
        "mskd_criteria": ["l1", "l2", "bn_gamma", "taylor", "fpgm", "hessian"],
        "mskd_allocations": ["global", "uniform"], "mskd_top_k": 3, "mskd_select_steps": 0,
        "pdc_epsilon": "auto", "weight_order": "sequential", "target_sparsity": 0.5,
        "cascade_num_tas": 1, "cascade_levels": [], "cascade_stage2_epochs": 1,
    }
    values.update(overrides)
    return values


def _check_report(out):
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    teacher, student = report["teacher"], report["student"]
    for entry in (teacher, student):
        assert set(entry) >= {"accuracy", "macs", "params"}
        assert 0.0 <= entry["accuracy"] <= 1.0
    # the plan removed channels for real: the stripped student is cheaper
    assert student["macs"] <= 0.52 * teacher["macs"]
    assert student["params"] < teacher["params"]
    assert student["plan"]
    formats = {a["format"] for a in report["artifacts"]}
    assert formats == {"tflite", "onnx"}
    for artifact in report["artifacts"]:
        assert artifact["size_bytes"] > 0
        assert artifact["max_abs_diff"] < 1e-3
        assert artifact["top1_agreement"] == 1.0
        assert artifact["latency_ms_p50"] > 0
        assert os.path.exists(os.path.join(out, artifact["path"]))
    assert set(report["stages"]) == set(workflow.STAGES) - {"report"}
    for stage in ("teacher", "compress", "finetune"):
        logs = [f for _, _, files in os.walk(os.path.join(out, "tb", stage)) for f in files]
        assert any(f.startswith("events.out.tfevents") for f in logs), stage
    for name in ("report.md", "accuracy_vs_macs.png", "latency.png", "kept_channels.png",
                 "state.json", "flags.json"):
        assert os.path.exists(os.path.join(out, name)), name
    return report


def test_pipeline_end_to_end_then_resume_after_crash(tmp_path, monkeypatch):
    values = _values(tmp_path)
    out = values["output_dir"]
    calls = []
    real = dict(workflow._STAGE_FNS)

    def crash(ctx, work):
        open(os.path.join(work, "half-written"), "w").close()
        raise KeyboardInterrupt("simulated kill mid-stage")

    for name, fn in real.items():
        monkeypatch.setitem(
            workflow._STAGE_FNS, name,
            lambda ctx, work, name=name, fn=fn: (calls.append(name), fn(ctx, work))[1],
        )
    monkeypatch.setitem(workflow._STAGE_FNS, "export", crash)
    with pytest.raises(KeyboardInterrupt):
        workflow.run(values)
    # The method's order: prune (compress), masked fine-tune (finetune), then strip.
    assert calls == ["teacher", "compress", "finetune", "strip"]
    assert not os.path.exists(os.path.join(out, "export"))
    assert not [n for n in os.listdir(out) if n.startswith(".export-")]

    calls.clear()
    monkeypatch.setitem(
        workflow._STAGE_FNS, "export",
        lambda ctx, work: (calls.append("export"), real["export"](ctx, work))[1],
    )
    markdown = workflow.run(values)
    # no finished stage ran again
    assert calls == ["export", "verify", "latency", "report"]
    assert "| teacher |" in markdown and "| tflite |" in markdown
    _check_report(out)
    # The teacher's float32 artifacts were timed in the same run as the student's, side by side.
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    rows = {(r["runtime"], r["threads"]): r for r in report["latency_comparison"]}
    assert set(rows) == {("litert", 1), ("onnxruntime", 1)}
    for row in rows.values():
        assert row["speedup"] == pytest.approx(row["teacher_p50_ms"] / row["student_p50_ms"])
        assert row["speedup_over_mac_speedup"] == pytest.approx(row["speedup"] / row["mac_speedup"])
    assert report["teacher"]["reference_artifact"]["latency_ms_p50"]["1"] == rows[("litert", 1)]["teacher_p50_ms"]
    assert "## Teacher vs student latency" in markdown
    # resnet8's input and logits groups are never pruned, and the report says why.
    unprunable = {g["group"]: g for g in report["student"]["unprunable_groups"]}
    assert len(unprunable) >= 2 and all(g["reason"] for g in unprunable.values())
    assert "## Groups left unpruned" in markdown
    with open(os.path.join(out, "latency", "latency.json")) as f:
        assert {r.get("label") for r in json.load(f)} == {None, "teacher"}

    # changing a flag that invalidates finished stages is refused, naming it
    with pytest.raises(FlagMismatchError, match="target_macs_reduction"):
        workflow.run(dict(values, target_macs_reduction=0.3))
    # ... unless restarting is asked for (only checked up to the refusal here)


def test_pipeline_rejects_teacher_with_wrong_number_of_classes(tmp_path):
    import keras

    from tfkdp import models

    teacher = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=5)
    path = str(tmp_path / "t.keras")
    teacher.save(path)
    with pytest.raises(ValueError, match="outputs 5 classes but dataset .* has 3"):
        workflow.run(_values(tmp_path, teacher=path))
    assert keras.saving.load_model(path).output_shape == (None, 5)


def test_pipeline_savedmodel_teacher_is_evaluated_but_not_copied_as_student(tmp_path):
    from tfkdp import models
    from tfkdp.pipelines.state import StageRunner

    teacher = models.resnet_cifar(8, width=4, input_shape=(12, 12, 1), num_classes=3)
    path = str(tmp_path / "teacher_sm")
    teacher.export(path, format="tf_saved_model", verbose=False)
    values = _values(tmp_path, teacher=path)
    with pytest.raises(ValueError, match="SavedModel teacher is inference-only"):
        workflow.run(values)
    runner = StageRunner(values["output_dir"], {k: v for k, v in values.items()
                                                if k != "output_dir"}, workflow.STAGE_FLAGS)
    summary = runner.record("teacher")["summary"]
    # evaluated through TFSMLayer: an accuracy, but no countable MACs or params
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["macs"] is None and summary["params"] is None


def _stop_after_teacher(monkeypatch):
    def stop(ctx, work):
        raise KeyboardInterrupt("stop after the teacher stage")

    monkeypatch.setitem(workflow._STAGE_FNS, "compress", stop)


def test_a_teacher_trained_here_is_saved_with_re_estimated_batch_norm_statistics(tmp_path, monkeypatch):
    import keras

    from tfkdp.train import phases

    before, after = [], []
    real = phases.recalibrate

    def bn_stats(model):
        return [np.array(w) for layer in model.layers
                if isinstance(layer, keras.layers.BatchNormalization)
                for w in (layer.moving_mean, layer.moving_variance)]  # fmt: skip

    def recording(model, data, training):
        before.append(bn_stats(model))
        n = real(model, data, training)
        after.append(bn_stats(model))
        return n

    monkeypatch.setattr(phases, "recalibrate", recording)
    _stop_after_teacher(monkeypatch)
    values = _values(tmp_path, teacher_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        workflow.run(values)
    assert len(after) == 1  # the teacher stage re-estimated once
    saved = bn_stats(keras.saving.load_model(os.path.join(values["output_dir"], "teacher", "teacher.keras")))
    assert len(saved) == len(after[0]) > 0
    for got, want in zip(saved, after[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the moving averages of one short epoch were not yet the batch statistics
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(after[0], before[0], strict=True)) > 1e-3


def test_a_teacher_near_chance_is_warned_about(tmp_path, monkeypatch, caplog):
    import keras

    inputs = keras.Input((12, 12, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    teacher = keras.Model(inputs, keras.layers.Dense(3, kernel_initializer="zeros")(x))  # logits all 0
    path = str(tmp_path / "constant.keras")
    teacher.save(path)
    _stop_after_teacher(monkeypatch)
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        workflow.run(_values(tmp_path, teacher=path))
    assert "near chance (33.33 % for 3 classes)" in caplog.text


def test_pipeline_missing_teacher_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        workflow.run(_values(tmp_path, teacher=str(tmp_path / "missing.keras")))


def test_pipeline_mirrored_strategy_runs_kdp_end_to_end(tmp_path):
    import tensorflow as tf

    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs the 2 logical CPU devices configured in conftest.py")
    # kdp: ADMM's in-step Z/U updates run cross-replica (a merge_call) under the strategy.
    values = _values(tmp_path, strategy="mirrored", teacher_epochs=1)
    workflow.run(values)
    _check_report(values["output_dir"])
    with open(os.path.join(values["output_dir"], "report.json")) as f:
        report = json.load(f)
    assert report["flags"]["strategy"] == "mirrored"
    assert report["artifacts"][0]["top1_agreement"] == 1.0


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--method=magic", "<kdp|prune_only|kd_only|"),
        ("--target_macs_reduction=1.5", "strictly between 0 and 1"),
        ("--formats=tflite,gguf", "subset of"),
        ("--strategy=tpu", "<default|mirrored|multiworker>"),
        ("--round_to=0", "--round_to must be 'auto' or a positive integer"),
    ],
)
def test_cli_bad_flags_get_absl_errors_listing_choices(flag, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tfkdp.pipelines.compress", flag, f"--output_dir={tmp_path}/o"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert not os.path.exists(tmp_path / "o")

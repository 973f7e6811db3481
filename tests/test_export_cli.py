"""`python -m tfkdp.export`: one end-to-end subprocess run, and each bad input as a clear error.

Error cases call `main` in-process on a private `FlagValues` (no global flag
state, no TF import per case); the happy path runs the real CLI in a
subprocess.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl import flags
from test_export import REPO_ROOT, build_tiny_model, structured_images, train_tiny_model

from tfkdp.export import __main__ as cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained tiny model saved as .keras, and its data as a uint8 .npz."""
    root = tmp_path_factory.mktemp("cli")
    model = train_tiny_model()
    model.save(root / "tiny.keras")
    x_train, y_train = structured_images(192, seed=0, dtype="uint8")
    x_test, y_test = structured_images(96, seed=1, dtype="uint8")
    np.savez(root / "data.npz", x_train=x_train[..., 0], y_train=y_train,
             x_test=x_test[..., 0], y_test=y_test)  # fmt: skip
    return root


def _parse(args):
    flag_values = flags.FlagValues()
    cli.define_flags(flag_values)
    flag_values(["tfkdp-export", *args])
    return flag_values


def _run_main(args):
    return cli.main(["tfkdp-export"], _parse(args))


def test_cli_end_to_end_exports_verifies_times_and_writes_report(files, tmp_path):
    out = tmp_path / "deploy"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [
            sys.executable, "-m", "tfkdp.export", f"--model={files / 'tiny.keras'}", f"--out={out}",
            "--formats=tflite,tflite_int8,onnx", f"--calibration=npz:{files / 'data.npz'}",
            "--calibration_samples=64", "--latency", "--threads=1,2", "--latency_warmup=1",
            "--latency_repeat=5",
        ],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "format" in completed.stdout and "p50 ms t=2" in completed.stdout
    assert sorted(os.listdir(tmp_path)) == ["deploy"]
    assert sorted(os.listdir(out)) == [
        "export_report.json", "model.onnx", "model.tflite", "model_int8.tflite"
    ]  # fmt: skip
    report = json.loads((out / "export_report.json").read_text())
    assert report["verified"] is True and report["failures"] == {}
    assert report["input_name"] == "image" and report["input_shape"] == [None, 12, 12, 1]
    assert set(report["verification"]) == {"tflite", "tflite_int8", "onnx"}
    for fmt, result in report["verification"].items():
        assert result["passed"] and result["n"] == 96, fmt
        assert result["accuracy"] >= 0.95, fmt
    assert report["verification"]["tflite"]["max_abs_diff_rel"] <= 1e-4
    assert report["verification"]["tflite_int8"]["top1_agreement"] >= 0.98
    assert [(r["format"], r["threads"]) for r in report["latency"]] == [
        (f, t) for f in ("tflite", "tflite_int8", "onnx") for t in (1, 2)
    ]
    assert report["artifacts"]["onnx"]["size_bytes"] == os.path.getsize(out / "model.onnx")
    assert report["flags"]["threads"] == ["1", "2"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--formats=tflite,tflite_int4"], "--formats takes names from saved_model,tflite"),
        (["--formats=tflite_int8"], "needs --calibration"),
        (["--calibration=mnist"], "'fashion_mnist' or 'npz:PATH'"),
        (["--threads=1,two"], "--threads takes positive integers"),
        (["--threads=0"], "--threads takes positive integers"),
    ],
)
def test_cli_rejects_bad_flags_at_parse_time(args, match):
    with pytest.raises(flags.IllegalFlagValueError, match=match):
        _parse(["--model=m.keras", "--out=o", *args])


def test_cli_requires_model_and_out():
    with pytest.raises(flags.IllegalFlagValueError, match="--model"):
        _parse(["--out=o"])


def test_cli_missing_model_file_exits_2(tmp_path, capsys):
    status = _run_main([f"--model={tmp_path / 'absent.keras'}", f"--out={tmp_path / 'o'}"])
    assert status == 2
    assert "model file not found" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_corrupt_model_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"this is not a zip archive")
    status = _run_main([f"--model={bad}", f"--out={tmp_path / 'o'}", "--formats=tflite"])
    assert status == 2
    assert f"could not load Keras model '{bad}'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["bad.keras"]


def test_cli_calibration_of_wrong_shape_exits_2(files, tmp_path, capsys):
    rng = np.random.default_rng(0)
    small = {k: rng.integers(0, 255, (8, 10, 10)).astype("uint8") for k in ("x_train", "x_test")}
    np.savez(tmp_path / "small.npz", y_train=np.zeros(8, "int64"), y_test=np.zeros(8, "int64"),
             **small)  # fmt: skip
    status = _run_main([
        f"--model={files / 'tiny.keras'}", f"--out={tmp_path / 'o'}", "--formats=tflite_int8",
        f"--calibration=npz:{tmp_path / 'small.npz'}",
    ])  # fmt: skip
    assert status == 2
    assert "calibration data has shape (8, 10, 10, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_calibration_of_wrong_dtype_exits_2(files, tmp_path, capsys):
    boolean = {k: np.zeros((8, 12, 12), bool) for k in ("x_train", "x_test")}
    np.savez(tmp_path / "bool.npz", y_train=np.zeros(8, "int64"), y_test=np.zeros(8, "int64"),
             **boolean)  # fmt: skip
    status = _run_main([
        f"--model={files / 'tiny.keras'}", f"--out={tmp_path / 'o'}", "--formats=tflite_int8",
        f"--calibration=npz:{tmp_path / 'bool.npz'}",
    ])  # fmt: skip
    assert status == 2
    assert "must be numeric; got dtype bool" in capsys.readouterr().err


def test_cli_unwritable_out_exits_2(files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status = _run_main(
        [f"--model={files / 'tiny.keras'}", f"--out={blocker / 'o'}", "--formats=tflite"]
    )
    assert status == 2
    assert "cannot be created" in capsys.readouterr().err


def test_cli_dynamic_dims_model_with_tflite_exits_2(files, tmp_path, capsys):
    keras.utils.set_random_seed(0)
    build_tiny_model(input_shape=(None, None, 1)).save(tmp_path / "dynamic.keras")
    status = _run_main([
        f"--model={tmp_path / 'dynamic.keras'}", f"--out={tmp_path / 'o'}", "--formats=tflite",
        f"--calibration=npz:{files / 'data.npz'}",
    ])  # fmt: skip
    assert status == 2
    assert "need fixed non-batch input dimensions" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_fashion_mnist_calibration_is_real_images_in_unit_range():
    try:
        calibration, x, y, description = cli.load_data("fashion_mnist", (28, 28, 1), 50, 20)
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST is not installed here: {error}")
    assert calibration.shape == (50, 28, 28, 1) and x.shape == (20, 28, 28, 1)
    assert calibration.dtype == np.float32 and 0.0 <= calibration.min() < calibration.max() <= 1.0
    assert y.shape == (20,) and set(y) <= set(range(10))
    # Real images: most pixels are background, not uniform noise (mean ~0.29).
    assert 0.15 < float(calibration.mean()) < 0.45
    assert "Fashion-MNIST" in description

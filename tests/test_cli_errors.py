"""User errors and divergence through `tfkdp-compress`, in a subprocess: one line, no traceback.

Bad input stops before any training with exit code 2 and leaves nothing but
flags.json/state.json; a NaN loss stops with exit code 1, the stage resumable.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from test_pipeline import _tiny_npz  # tests/ is on sys.path (rootdir-relative, no package)


def _run(tmp_path, *flags, timeout=300):
    out = tmp_path / "out"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "tfkdp.pipelines.compress", f"--output_dir={out}",
               "--teacher_epochs=1", "--compress_epochs=1", "--finetune_epochs=1",
               "--batch_size=16", "--formats=tflite", "--verify_samples=16", "--round_to=2", *flags]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=tmp_path)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if line.startswith("tfkdp-compress: error:")]
    return result, errors, out


def _assert_one_line_user_error(result, errors, out, needle):
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert set(os.listdir(out)) <= {"flags.json", "state.json"}  # no stage ran


def _nan_npz(path):
    data = dict(np.load(_tiny_npz(path)))
    x = data["x_train"].astype("float32")
    x[3, 2, 2] = np.nan
    data["x_train"] = x
    np.savez(path, **data)
    return str(path)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("nan_images", "NaN"),
        ("zoo_name", "resnet20"),  # the message lists the zoo
        ("corrupt_keras", "is not a valid Keras file"),
        ("unreachable_budget", "--target_macs_reduction=0.5 is not reachable"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_training(case, needle, tmp_path):
    npz = _tiny_npz(tmp_path / "d.npz")
    flags = [f"--dataset=npz:{npz}", "--teacher=resnet8", "--round_to=2"]
    if case == "nan_images":
        flags[0] = f"--dataset=npz:{_nan_npz(tmp_path / 'nan.npz')}"
    elif case == "zoo_name":
        flags[1] = "--teacher=resnet9"
    elif case == "corrupt_keras":
        bad = tmp_path / "teacher.keras"
        bad.write_bytes(b"this is not a zip archive")
        flags[1] = f"--teacher={bad}"
    else:
        # Counts in multiples of 64: resnet8's 16/32/64-channel groups cannot shrink at all.
        flags[2] = "--round_to=64"
    result, errors, out = _run(tmp_path, *flags)
    _assert_one_line_user_error(result, errors, out, needle)


def test_a_nan_loss_is_one_line_exit_1_and_the_finished_stages_are_kept(tmp_path):
    npz = _tiny_npz(tmp_path / "d.npz")
    # A learning rate of 1e12 sends the ADMM + KD phase to inf/NaN within a few steps.
    result, errors, out = _run(tmp_path, f"--dataset=npz:{npz}", "--teacher=resnet8",
                               "--round_to=2", "--lr=1e12")  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "diverged" in errors[0] and "'compress'" in errors[0] and "--lr" in errors[0]
    assert "Traceback" not in result.stderr
    assert os.path.isdir(out / "teacher") and not os.path.exists(out / "compress")

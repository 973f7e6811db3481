"""Pre-flight checks (pipelines.validate), NaN/inf data in tfkdp.data, and the CLI's
one-line answer to a diverged training."""

import json
import os

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

import tfkdp
from tfkdp import data
from tfkdp.pipelines import validate

# --- (a) NaN/inf images -----------------------------------------------------------------


def test_check_finite_names_the_array_and_counts_bad_values():
    x = np.zeros((4, 3, 3, 1), "float32")
    x[0, 0, 0, 0], x[2, 1, 1, 0], x[3, 2, 2, 0] = np.nan, np.inf, -np.inf
    with pytest.raises(ValueError, match=r"^x_train of npz:d.npz has 3 NaN/inf values \(of 36\)"):
        validate.check_finite(x, "x_train of npz:d.npz")
    ok = np.ones((2, 2), "float32")
    assert validate.check_finite(ok, "x") is ok
    assert validate.check_finite(np.full((2, 2), 255, "uint8"), "x") is not None


def test_count_nonfinite_scans_in_chunks():
    x = np.zeros(1000, "float64")
    x[[0, 499, 500, 999]] = [np.nan, np.inf, np.nan, -np.inf]
    # A chunk smaller than the array: the chunk borders must not drop or double values.
    assert data.count_nonfinite(x, chunk=7) == 4
    assert data.count_nonfinite(np.arange(10)) == 0


def _npz(path, x_train):
    rng = np.random.default_rng(0)
    np.savez(
        path, x_train=x_train, y_train=rng.integers(0, 3, len(x_train)),
        x_test=np.zeros((4, *x_train.shape[1:]), x_train.dtype), y_test=np.arange(4) % 3,
    )  # fmt: skip


def test_from_npz_and_load_dataset_reject_nan_images_naming_the_file(tmp_path):
    x = np.random.default_rng(0).uniform(size=(8, 6, 6)).astype("float32")
    x[1, 2, 3] = np.nan
    x[5, 0, 0] = np.inf
    path = tmp_path / "bad.npz"
    _npz(path, x)
    with pytest.raises(ValueError, match=r"x_train in '.*bad\.npz' has 2 NaN/inf values"):
        data.from_npz(str(path))
    with pytest.raises(ValueError, match="bad.npz"):
        data.load_dataset(f"npz:{path}")


# --- (b) teacher / student specs --------------------------------------------------------


def test_unknown_zoo_name_lists_the_zoo():
    with pytest.raises(ValueError) as info:
        validate.check_model_spec("resnet9", "teacher")
    message = str(info.value)
    assert message.startswith("--teacher='resnet9' is neither a zoo model nor an existing path")
    assert all(name in message for name in tfkdp.models.names())
    assert "\n" not in message


def test_model_specs_accept_zoo_keyword_and_paths(tmp_path):
    assert validate.check_model_spec("resnet8", "teacher") == "zoo"
    assert validate.check_model_spec("teacher", "student", keywords=("teacher",)) == "keyword"
    saved = tmp_path / "sm"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    assert validate.check_model_spec(str(saved), "teacher") == "path"
    with pytest.raises(ValueError, match="--student=.* folder without saved_model.pb|is a folder"):
        validate.check_model_spec(str(tmp_path), "student", allow_savedmodel=False)
    with pytest.raises(FileNotFoundError, match="--teacher='/no/such/t.keras' does not exist"):
        validate.check_model_spec("/no/such/t.keras", "teacher")


# --- (c) corrupt Keras files ------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_corrupt_keras_file_is_invalid_not_missing(tmp_path, suffix):
    path = tmp_path / f"teacher{suffix}"
    path.write_bytes(b"\x00 half of a model")
    with pytest.raises(ValueError) as info:
        validate.check_model_spec(str(path), "teacher")
    message = str(info.value)
    assert message.startswith(f"--teacher={str(path)!r} is not a valid Keras file: ")
    assert "File not found" not in message and "does not exist" not in message
    assert "\n" not in message


def test_keras_zip_without_config_is_invalid(tmp_path):
    import zipfile

    path = tmp_path / "empty.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(ValueError, match=r"is not a valid Keras file: KeyError: .*config\.json"):
        validate.check_keras_file(str(path), "student")


def test_valid_keras_file_is_loaded_once_and_returned(tmp_path):
    model = tfkdp.models.resnet_cifar(8, width=4, input_shape=(8, 8, 1), num_classes=3)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = validate.check_keras_file(str(path), "teacher")
    assert loaded.count_params() == model.count_params()
    assert validate.check_model_spec(str(path), "student", allow_savedmodel=False) == "path"


# --- (d) budget reachability ------------------------------------------------------------


def test_unreachable_budget_names_the_flags():
    model = tfkdp.models.resnet_cifar(8, width=8, input_shape=(16, 16, 1))
    with pytest.raises(ValueError) as info:
        validate.check_budget_reachable(model, 0.5, round_to=64)
    message = str(info.value)
    assert message.startswith("--target_macs_reduction=0.5 is not reachable on ")
    assert "--round_to=64" in message and "largest reachable" in message
    assert "\n" not in message


def test_reachable_budget_returns_a_plan_meeting_it():
    model = tfkdp.models.resnet_cifar(8, width=8, input_shape=(16, 16, 1))
    plan = validate.check_budget_reachable(model, 0.5, round_to=4)
    kept = tfkdp.plan_macs(model, plan) / tfkdp.count_macs(model)
    assert kept <= 0.5 + 0.02  # make_plan's default tolerance on the MAC target


# --- NaN loss in the CLI ----------------------------------------------------------------


def test_diverged_training_is_one_line_with_stage_and_exit_1(tmp_path, monkeypatch, capsys):
    from tfkdp.pipelines import compress, workflow

    error_cls = compress._non_finite_loss_error()
    (tmp_path / "state.json").write_text(json.dumps({"completed": {"teacher": {}}}))

    def diverge(values, restart=False):
        raise error_cls("compress: the loss became nan at batch 3; weights restored to epoch 1.\n"
                        "Lower the learning rate")

    monkeypatch.setattr(workflow, "run", diverge)
    with flagsaver.flagsaver():
        flags.FLAGS(["tfkdp-compress", f"--output_dir={tmp_path}"])
        status = compress.main(["tfkdp-compress"])
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    line = err[0]
    assert line.startswith("tfkdp-compress: error: training diverged (loss became NaN/inf) in "
                           "stage 'compress'")
    assert "['teacher'] are kept in" in line and os.fspath(tmp_path) in line
    assert "rerunning resumes there" in line and "--lr" in line

"""`keras.applications` teachers through the whole pipeline, each with its own input scaling.

MobileNetV2, MobileNetV3Small, EfficientNetB0, ResNet50 and DenseNet121
(`weights=None`, 32×32×3, 3 classes) saved as `.keras` teachers and run by
`workflow.run`: channel groups, compress (`prune_only`: an L1 plan at half the
MACs and one fine-tune step), strip (checked equal to the masked model),
export, verification, latency and the report. Untrained weights and tiny data:
this checks the graph handling and the wiring, not accuracy.
"""

import json
import os

import keras
import numpy as np
import pytest

import tfkdp
from tfkdp.pipelines import workflow

_APPS = keras.applications
_SHAPE = (32, 32, 3)
# name: (builder, the scaling keras.applications' preprocess_input uses for it)
APPLICATIONS = {
    "MobileNetV2": (lambda: _APPS.MobileNetV2(
        input_shape=_SHAPE, alpha=0.35, weights=None, classes=3, classifier_activation=None
    ), "symmetric"),
    # MobileNetV3 and EfficientNet rescale inside (a Rescaling / Normalization layer): raw pixels.
    "MobileNetV3Small": (lambda: _APPS.MobileNetV3Small(
        input_shape=_SHAPE, alpha=0.75, weights=None, classes=3, classifier_activation=None
    ), "raw"),
    "EfficientNetB0": (lambda: _APPS.EfficientNetB0(
        input_shape=_SHAPE, weights=None, classes=3, classifier_activation=None
    ), "raw"),
    "ResNet50": (lambda: _APPS.ResNet50(
        input_shape=_SHAPE, weights=None, classes=3, classifier_activation=None
    ), "caffe"),
    "DenseNet121": (lambda: _APPS.DenseNet121(
        input_shape=_SHAPE, weights=None, classes=3, classifier_activation=None
    ), "torch"),
}  # fmt: skip


def _rgb_npz(path, n_train=36, n_test=16, classes=3):
    """uint8 32×32×3 images spanning 0..255: class c has a saturated band in channel c."""
    rng = np.random.default_rng(0)

    def make(n):
        y = np.arange(n) % classes
        x = rng.integers(0, 60, size=(n, *_SHAPE)).astype("uint8")
        band = _SHAPE[1] // classes
        for i, label in enumerate(y):
            x[i, :, label * band : (label + 1) * band, label] = 255
        return x, y.astype("int64")

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


# Measured on the shared 2-core machine (loaded, load average ~8): MobileNetV2 alone took
# ~330 s wall / ~150 s CPU (one traced train step ~118 s, SavedModel + tflite export ~124 s,
# the teacher's tflite export again in the latency stage). Far over the suite's budget of
# ~90 s for these tests, so they run on request, never silently: the skip reason says how.
_OPT_IN = "TFKDP_APPLICATION_TESTS"


@pytest.mark.parametrize("name", list(APPLICATIONS))
def test_keras_application_teacher_goes_through_the_pipeline(name, tmp_path):
    from test_pipeline import _values  # tests/ is on sys.path (rootdir-relative, no package)

    if os.environ.get(_OPT_IN) != "1":
        pytest.skip(
            f"keras.applications end to end takes minutes per model ({name}); run with {_OPT_IN}=1"
        )

    build, input_scaling = APPLICATIONS[name]
    keras.utils.set_random_seed(0)
    teacher = build()
    groups = tfkdp.channel_groups(teacher)
    teacher.save(tmp_path / "teacher.keras")
    del teacher
    # MobileNetV2 also bakes its scaling into the artifacts: they take raw pixels.
    bake = name == "MobileNetV2"
    values = _values(
        tmp_path, teacher=str(tmp_path / "teacher.keras"),
        dataset=f"npz:{_rgb_npz(tmp_path / 'rgb.npz')}", method="prune_only",
        compress_epochs=1, finetune_epochs=0, compress_train_subset=16, batch_size=16,
        round_to=2, formats=["tflite"], latency_repeat=2, verify_samples=16,
        input_scaling=input_scaling, bake_preprocessing=bake,
    )  # fmt: skip
    workflow.run(values)
    out = values["output_dir"]
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    teacher_entry, student = report["teacher"], report["student"]

    # Channel groups: only the model input and the logits are unprunable, and the report says why.
    unprunable = {g["group"]: g["reason"] for g in student["unprunable_groups"]}
    assert unprunable == {g.id: g.reason for g in groups if not g.prunable}
    assert len(unprunable) == 2, unprunable
    assert sorted(r.split(" ")[0] for r in unprunable.values()) == ["model", "reaches"]
    # Compress: an L1 plan at half the MACs (make_plan lands within 2 % of the target).
    assert student["plan"] and student["macs"] <= 0.52 * teacher_entry["macs"]
    assert student["params"] < teacher_entry["params"]
    # Strip: the stage refuses a stripped model that differs from the masked one by more
    # than 1e-4 of the output scale; its summary is the report's student.
    with open(os.path.join(out, "state.json")) as f:
        completed = json.load(f)["completed"]
    assert completed["strip"]["summary"]["macs"] == student["macs"]
    assert np.isfinite(completed["strip"]["summary"]["max_abs_diff_vs_masked"])
    # Export + verification: the float32 tflite matches Keras to 1e-4 of the output scale
    # (summation order only), on raw pixels against the scaled Keras inputs when baked.
    with open(os.path.join(out, "verify", "verify.json")) as f:
        verified = json.load(f)["tflite"]
    assert verified["passed"] and verified["max_abs_diff_rel"] <= 1e-4
    assert verified["top1_agreement"] == 1.0
    assert [a["format"] for a in report["artifacts"]] == ["tflite"]
    assert report["artifacts"][0]["latency_ms_p50"] > 0 and not report["rejected"]
    assert report["flags"]["input_scaling"] == input_scaling
    assert report["flags"]["bake_preprocessing"] is bake
    assert completed["export"]["summary"]["bake_scaling"] == (input_scaling if bake else None)

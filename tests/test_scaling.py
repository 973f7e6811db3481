"""Input scaling (`tfkdp.scaling`): the registry, the loaders, baking into exported artifacts."""

import json
import os

import keras
import numpy as np
import pytest
from keras.applications import imagenet_utils

from tfkdp import data, export, scaling
from tfkdp.export.latency import _benchmark_input
from tfkdp.pipelines import workflow

BUILT_IN = ("unit", "raw", "symmetric", "caffe", "torch")


def _pixels(n=8, shape=(5, 5, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape)).astype("uint8")


def test_registry_lists_the_five_built_in_scalings_first():
    assert scaling.names()[:5] == BUILT_IN
    assert scaling.get("caffe") is scaling.get(scaling.get("caffe"))


@pytest.mark.parametrize(
    "name, mode", [("symmetric", "tf"), ("caffe", "caffe"), ("torch", "torch")]
)
def test_scalings_equal_keras_applications_preprocess_input(name, mode):
    x = _pixels()
    expected = imagenet_utils.preprocess_input(x.astype("float32"), mode=mode)
    # Same operations in the same order: equal to float32 rounding.
    np.testing.assert_allclose(
        data.preprocess(x, scaling=name).numpy(), expected, rtol=0, atol=1e-5
    )


def test_unit_and_raw_scalings_and_float_inputs_in_unit_range():
    x = _pixels()
    np.testing.assert_array_equal(data.preprocess(x).numpy(), x.astype("float32") / 255.0)
    np.testing.assert_array_equal(data.preprocess(x, scaling="raw").numpy(), x.astype("float32"))
    # Float images are already pixels / 255: unit passes them unchanged (today's behaviour) ...
    unit = x.astype("float32") / 255.0
    np.testing.assert_array_equal(data.preprocess(unit).numpy(), unit)
    # ... and the other scalings map them as they map the pixels (x 255 rounds in float32).
    for name in BUILT_IN:
        np.testing.assert_allclose(
            data.preprocess(unit, scaling=name).numpy(),
            data.preprocess(x, scaling=name).numpy(),
            rtol=1e-5,
            atol=1e-4,
        )
    np.testing.assert_array_equal(data.to_pixels(unit * 1.0), np.round(unit * 255.0))


def test_grayscale_caffe_and_torch_use_the_mean_of_the_three_channel_constants():
    x = _pixels(shape=(4, 4))  # (N, H, W): one channel
    gray = x[..., None].astype("float32")
    caffe_mean = np.mean([103.939, 116.779, 123.68])
    np.testing.assert_allclose(
        data.preprocess(x, scaling="caffe").numpy(), gray - caffe_mean, atol=1e-4
    )
    mean, std = np.mean([0.485, 0.456, 0.406]), np.mean([0.229, 0.224, 0.225])
    np.testing.assert_allclose(
        data.preprocess(x, scaling="torch").numpy(), (gray / 255.0 - mean) / std, atol=1e-5
    )


def test_unknown_scaling_is_a_value_error_listing_the_valid_names():
    listing = "valid names are unit, raw, symmetric, caffe, torch"
    with pytest.raises(ValueError, match=f"unknown input scaling 'imagenet'; {listing}"):
        scaling.get("imagenet")
    x, y = _pixels(), np.zeros(8, "int32")
    with pytest.raises(ValueError, match=listing):
        data.make_dataset(x, y, 4, scaling="imagenet")
    with pytest.raises(ValueError, match=listing):
        scaling.ScaleInputs("imagenet")


def test_per_channel_scalings_refuse_two_channel_images():
    x, y = _pixels(shape=(4, 4, 2)), np.zeros(8, "int32")
    with pytest.raises(ValueError, match="'caffe' has per-channel constants .* the images have 2"):
        data.make_dataset(x, y, 4, scaling="caffe")
    # A scalar scaling does not care about the channel count.
    batch = next(iter(data.make_dataset(x, y, 4, scaling="symmetric")))[0].numpy()
    np.testing.assert_allclose(batch, x[:4] / 127.5 - 1.0, atol=1e-6)


def test_scale_inputs_config_round_trips_and_the_baked_model_scales_raw_pixels():
    layer = scaling.ScaleInputs("torch", name="scale")
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, scaling.ScaleInputs) and clone.get_config() == layer.get_config()
    inner = keras.Sequential([keras.Input((5, 5, 3)), keras.layers.Conv2D(2, 1, name="c")])
    baked = scaling.with_scaling(inner, "caffe")
    raw = data.to_pixels(_pixels())
    expected = inner(data.preprocess(_pixels(), scaling="caffe"))
    np.testing.assert_allclose(baked(raw), expected, atol=1e-5)
    assert baked.inputs[0].name == "pixels"


def test_benchmark_inputs_are_scaled_pixels_or_raw_pixels_for_baked_artifacts():
    raw = _benchmark_input((4, 4, 3), 2, seed=0, raw_pixels=True)
    assert raw.min() >= 0 and raw.max() <= 255 and np.array_equal(raw, np.round(raw))
    scaled = _benchmark_input((4, 4, 3), 2, seed=0, input_scaling="caffe")
    np.testing.assert_allclose(scaled, scaling.get("caffe")(raw), atol=1e-5)


# -- every scaling through export (baked) and verification, on one trained model ---------


def _bands(n, seed, size=12, classes=3):
    """RGB uint8 images: class c has a bright vertical band at c·size/classes; pixels span 0..255."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, size=(n, size, size, 3)).astype("uint8")
    band = size // classes
    for i, label in enumerate(y):
        x[i, :, label * band : (label + 1) * band] = 255
    x[:, 0, 0] = 0  # the full 0..255 range: tflite_int8's uint8 input gets scale 1, zero point 0
    return x, y.astype("int64")


@pytest.fixture(scope="module")
def unit_model():
    """A tiny CNN trained on unit-scaled band images, and calibration/test images."""
    keras.utils.set_random_seed(0)
    x, y = _bands(96, seed=0)
    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, activation="relu", name="c1"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, name="logits"),
    ])  # fmt: skip
    model.compile(keras.optimizers.Adam(0.02),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
    model.fit(data.make_dataset(x, y, 32, training=True, pad=0), epochs=15, verbose=0)
    x_test, y_test = _bands(128, seed=1)
    return model, x, x_test, y_test


def _expecting(model, name):
    """`model` behind a fixed 1x1 conv that undoes scaling `name`: a model trained for `name`.

    For the affine scalings, `y = (flip(p) / d - mean) / std`, so the unit
    input is `p / 255 = flip(y · std + mean) · d / 255`: one per-channel scale,
    a channel permutation (caffe) and a bias.
    """
    rule = scaling.get(name)
    mean, std = (np.broadcast_to(v, 3) for v in rule.constants(3))
    kernel = np.zeros((1, 1, 3, 3), "float32")
    bias = np.zeros(3, "float32")
    for c_in in range(3):
        c_out = 2 - c_in if rule.bgr else c_in
        kernel[0, 0, c_in, c_out] = std[c_in] * rule.divisor / 255.0
        bias[c_out] = mean[c_in] * rule.divisor / 255.0
    undo = keras.layers.Conv2D(3, 1, name="undo")
    inputs = keras.Input((12, 12, 3))
    outputs = model(undo(inputs))
    undo.set_weights([kernel, bias])
    return keras.Model(inputs, outputs, name=f"expects_{name}")


@pytest.mark.parametrize("name", BUILT_IN)
def test_baked_scaling_round_trips_through_export_and_verification(name, unit_model, tmp_path):
    model, x_cal, x_test, y_test = unit_model
    student = _expecting(model, name)
    reference = np.asarray(model(data.preprocess(x_test)))
    # The scaled inputs reach the unit model exactly (up to float32 rounding of the 1x1 conv).
    np.testing.assert_allclose(
        student(data.preprocess(x_test, scaling=name)),
        reference,
        atol=1e-4 * np.abs(reference).max(),
    )
    paths = export.export_model(
        student, str(tmp_path / "out"), formats=("tflite", "tflite_int8"),
        calibration=data.to_pixels(x_cal), bake_scaling=name,
    )  # fmt: skip
    # Raw pixels to the artifacts, scaled images to Keras.
    results = export.verify(student, dict(paths), data.to_pixels(x_test), y_test, bake_scaling=name)
    assert results["tflite"]["max_abs_diff_rel"] <= 1e-4  # float32: summation order only
    assert results["tflite_int8"]["top1_agreement"] >= 0.98  # int8: the documented top-1 bar
    assert results["tflite"]["keras_accuracy"] == pytest.approx(
        np.mean(reference.argmax(-1) == y_test)
    )

    # On the device: uint8 pixels fed as they are (scale 1, zero point 0), no float step.
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=paths["tflite_int8"])
    detail = interpreter.get_input_details()[0]
    assert detail["dtype"] == np.uint8 and detail["quantization"] == (1.0, 0)
    interpreter.resize_tensor_input(detail["index"], list(x_test.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], x_test)
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert np.mean(logits.argmax(-1) == reference.argmax(-1)) >= 0.98

    rows = export.benchmark_latency(dict(paths), (12, 12, 3), warmup=1, repeat=2, bake_scaling=name)
    assert {r["format"] for r in rows} == {"tflite", "tflite_int8"} and all(
        r["p50_ms"] > 0 for r in rows
    )


def test_pipeline_refuses_an_unknown_input_scaling_before_any_training(tmp_path):
    from test_pipeline import _values  # tests/ is on sys.path (rootdir-relative, no package)

    values = _values(tmp_path, input_scaling="imagenet")
    with pytest.raises(
        ValueError, match="unknown input scaling 'imagenet'; valid names are unit, raw"
    ):
        workflow.run(values)
    with open(os.path.join(values["output_dir"], "state.json")) as f:
        assert json.load(f).get("completed", {}) == {}
    assert not os.path.exists(os.path.join(values["output_dir"], "teacher"))

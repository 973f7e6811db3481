"""export: every format on its real runtime against Keras, atomic writes, bad input, latency.

One small model (BN, a residual Add, a depthwise conv; 12×12×1 input) is
trained for a few epochs on structured images (class = which third of the
image is bright) so its predictions are confident, then exported once to all
formats for the module.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from tfkdp import export
from tfkdp.export import converters, runners

INPUT_SHAPE = (12, 12, 1)
NUM_CLASSES = 3
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def structured_images(n, seed, dtype="float32"):
    """`n` 12×12×1 images; class c has columns 4c..4c+3 bright, noise elsewhere.

    Same recipe as conftest's `tiny_images`, sized for training and a
    held-out set. float32 in [0, 1], or uint8 in [0, 255].
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.2, size=(n, *INPUT_SHAPE)).astype("float32")
    y = np.arange(n) % NUM_CLASSES
    for i, label in enumerate(y):
        x[i, :, label * 4 : label * 4 + 4, 0] += 0.8
    if dtype == "uint8":
        return np.round(x * 255).astype("uint8"), y.astype("int64")
    return x, y.astype("int32")


def build_tiny_model(input_shape=INPUT_SHAPE):
    """Conv-BN-ReLU, a depthwise branch added back (residual Add), strided conv, GAP, Dense."""
    inputs = keras.Input(input_shape, name="image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inputs)
    # momentum 0.9: the moving statistics settle within the few steps we train.
    x = layers.BatchNormalization(momentum=0.9, name="conv1_bn")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dwconv")(x)
    y = layers.BatchNormalization(momentum=0.9, name="dwconv_bn")(y)
    y = layers.ReLU(name="dwconv_relu")(y)
    x = layers.Add(name="add")([x, y])
    # 3·3·8·16 = 1152 weights: above the 1024-element threshold of TFLite's
    # dynamic-range quantisation, so tflite_dynamic has an int8 weight.
    x = layers.Conv2D(16, 3, strides=2, padding="same", name="conv2")(x)
    x = layers.ReLU(name="conv2_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny")


def train_tiny_model(seed=1234):
    keras.utils.set_random_seed(seed)
    model = build_tiny_model()
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    x, y = structured_images(192, seed=0)
    model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained():
    model = train_tiny_model()
    x_train, _ = structured_images(192, seed=0)
    x_test, y_test = structured_images(96, seed=1)
    return model, x_train, x_test, y_test


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    model, x_train, _, _ = trained
    root = tmp_path_factory.mktemp("exported")
    paths = export.export_model(model, str(root / "out"), calibration=x_train[:64])
    return paths, root


def _runner_outputs(fmt, path, x, batch_size):
    runner = export.open_runner(fmt, path)
    return np.concatenate([runner(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


# --- export_model -----------------------------------------------------------------------


def test_export_model_writes_every_format_and_onnx_passes_checker(exported):
    import onnx

    paths, root = exported
    assert set(paths) == set(export.FORMATS)
    assert paths.failures == {}
    for fmt, path in paths.items():
        assert path == str(root / "out" / export.FILENAMES[fmt])
        assert os.path.exists(path), fmt
    assert os.path.isfile(os.path.join(paths["saved_model"], "saved_model.pb"))
    onnx.checker.check_model(paths["onnx"], full_check=True)
    # Nothing but the output folder: the staging folder is gone.
    assert sorted(os.listdir(root)) == ["out"]
    assert sorted(os.listdir(root / "out")) == sorted(export.FILENAMES.values())


def test_exported_files_get_umask_permissions_not_private_temp_ones(exported):
    paths, _ = exported
    umask = os.umask(0o022)
    os.umask(umask)
    for fmt in ("tflite", "tflite_int8", "onnx"):
        assert os.stat(paths[fmt]).st_mode & 0o777 == 0o666 & ~umask, fmt


def test_saved_model_serving_signature_has_named_input(exported):
    paths, _ = exported
    loaded = tf.saved_model.load(paths["saved_model"])
    _, specs = loaded.signatures["serving_default"].structured_input_signature
    assert list(specs) == ["image"]
    assert specs["image"].shape.as_list() == [None, *INPUT_SHAPE]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_verify_every_artifact_on_its_runtime_matches_keras(trained, exported, batch_size):
    model, _, x_test, y_test = trained
    paths, _ = exported
    results = export.verify(model, dict(paths), x_test, y_test, batch_size=batch_size)

    reference = model.predict(x_test, verbose=0)
    scale = np.max(np.abs(reference))
    # The model really learned the task, so top-1 agreement is meaningful.
    assert np.mean(np.argmax(reference, -1) == y_test) >= 0.95
    assert set(results) == set(export.FORMATS)
    expected_runtime = {"saved_model": "tensorflow", "onnx": "onnxruntime"}
    for fmt, result in results.items():
        assert result["runtime"] == expected_runtime.get(fmt, "litert")
        assert result["passed"] and result["n"] == len(x_test)
        assert result["output_scale"] == pytest.approx(scale, rel=1e-6)
    # Float32 graphs: only summation order differs (measured ~1e-6 relative).
    for fmt in ("saved_model", "tflite", "onnx"):
        assert results[fmt]["max_abs_diff"] <= 1e-4 * scale, fmt
        assert results[fmt]["top1_agreement"] == 1.0
    # float16 weights: 11-bit mantissa.
    assert results["tflite_f16"]["max_abs_diff"] <= 1e-2 * scale
    # Quantised formats: argmax agreement on real structured data.
    for fmt in ("tflite_dynamic", "tflite_int8"):
        assert results[fmt]["top1_agreement"] >= 0.98, fmt
        assert results[fmt]["accuracy"] >= results[fmt]["keras_accuracy"] - 0.02
        # and they are actually quantised: not bit-identical to float.
        assert results[fmt]["max_abs_diff"] > 0


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_artifact_batch_of_three_equals_three_batches_of_one(trained, exported, fmt):
    model, _, x_test, _ = trained
    paths, _ = exported
    x = x_test[:3]
    batched = _runner_outputs(fmt, paths[fmt], x, batch_size=3)
    single = _runner_outputs(fmt, paths[fmt], x, batch_size=1)
    assert batched.shape == single.shape == (3, NUM_CLASSES)
    if fmt == "tflite_dynamic":
        # Hybrid kernels quantise activations per batch: batch composition
        # moves the numbers slightly; decisions must not move.
        np.testing.assert_array_equal(np.argmax(batched, -1), np.argmax(single, -1))
    else:
        np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)
    if fmt in ("saved_model", "tflite", "onnx"):
        np.testing.assert_allclose(batched, model.predict(x, verbose=0), rtol=0, atol=1e-5)


def test_tflite_dynamic_stores_int8_weights_and_int8_model_is_fully_integer(exported):
    from ai_edge_litert.interpreter import Interpreter

    paths, _ = exported

    def tensor_dtypes(path):
        interpreter = Interpreter(model_path=path)
        return {d["name"]: np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}

    dynamic = tensor_dtypes(paths["tflite_dynamic"])
    assert any(dt == np.int8 and "conv2" in name for name, dt in dynamic.items())
    float_model = tensor_dtypes(paths["tflite"])
    assert all(dt != np.int8 for dt in float_model.values())

    full = Interpreter(model_path=paths["tflite_int8"])
    io_indices = {full.get_input_details()[0]["index"], full.get_output_details()[0]["index"]}
    float_tensors = [
        d["name"] for d in full.get_tensor_details()
        if np.dtype(d["dtype"]) == np.float32 and d["index"] not in io_indices
    ]  # fmt: skip
    # Float only at the interface (input before QUANTIZE, output after DEQUANTIZE).
    assert float_tensors == []


def test_int8_io_model_takes_int8_and_verifies_through_scale_and_zero_point(trained, tmp_path):
    model, x_train, x_test, y_test = trained
    paths = export.export_model(
        model, str(tmp_path / "out"), formats=("tflite_int8",), calibration=x_train[:64],
        int8_io=True,
    )  # fmt: skip
    runner = export.open_runner("tflite_int8", paths["tflite_int8"])
    assert runner.input_dtype == np.int8 and runner.output_dtype == np.int8
    scale, zero_point = runner.interpreter.get_input_details()[0]["quantization"]
    feed = runner.prepare(x_test[:2])
    np.testing.assert_array_equal(
        feed, np.clip(np.round(x_test[:2] / scale) + zero_point, -128, 127).astype(np.int8)
    )
    results = export.verify(model, dict(paths), x_test, y_test, batch_size=3)
    assert results["tflite_int8"]["top1_agreement"] >= 0.98


def test_calibration_from_tf_data_dataset_of_image_label_batches(trained, tmp_path):
    model, x_train, x_test, y_test = trained
    dataset = tf.data.Dataset.from_tensor_slices((x_train[:64], np.zeros(64, "int32"))).batch(16)
    paths = export.export_model(
        model, str(tmp_path / "out"), formats=("tflite_int8",), calibration=dataset
    )
    results = export.verify(model, dict(paths), x_test, y_test)
    assert results["tflite_int8"]["top1_agreement"] >= 0.98


# --- verify failures ----------------------------------------------------------------------


def test_verify_raises_naming_artifact_measured_and_allowed_when_model_differs(trained, exported):
    model, _, x_test, _ = trained
    paths, _ = exported
    other = keras.models.clone_model(model)
    other.set_weights(model.get_weights())
    bias = other.get_layer("logits").bias
    bias.assign(bias.numpy() + np.array([1.0, 0.0, 0.0], "float32"))
    with pytest.raises(export.VerificationError) as info:
        export.verify(other, {"tflite": paths["tflite"], "onnx": paths["onnx"]}, x_test)
    error = info.value
    assert isinstance(error, ValueError)
    message = str(error)
    assert "tflite" in message and "onnx" in message
    assert "max_abs_diff = 1" in message and "allowed <=" in message
    assert error.results["tflite"]["passed"] is False
    assert error.results["tflite"]["max_abs_diff"] == pytest.approx(1.0, abs=1e-4)


def test_verify_tolerance_override_is_applied_and_unknown_keys_rejected(trained, exported):
    model, _, x_test, _ = trained
    paths, _ = exported
    with pytest.raises(export.VerificationError, match=r"tflite_f16 .*max_abs_diff"):
        export.verify(
            model, {"tflite_f16": paths["tflite_f16"]}, x_test,
            tolerances={"tflite_f16": {"max_abs_diff_rel": 1e-9}},
        )  # fmt: skip
    with pytest.raises(ValueError, match="max_abs_diff_rel"):
        export.verify(model, {"tflite": paths["tflite"]}, x_test, tolerances={"tflite": {"atol": 1}})
    with pytest.raises(ValueError, match="unknown format"):
        export.verify(model, {"tflite": paths["tflite"]}, x_test, tolerances={"tfl": {}})


def test_verify_rejects_inputs_of_wrong_shape_or_dtype(trained, exported):
    model, _, x_test, y_test = trained
    paths, _ = exported
    artifacts = {"tflite": paths["tflite"]}
    with pytest.raises(ValueError, match=r"x has shape \(4, 10, 10, 1\)"):
        export.verify(model, artifacts, np.zeros((4, 10, 10, 1), "float32"))
    with pytest.raises(ValueError, match="dtype uint8"):
        export.verify(model, artifacts, np.zeros((4, *INPUT_SHAPE), "uint8"))
    with pytest.raises(ValueError, match="one per sample"):
        export.verify(model, artifacts, x_test, y_test[:5])
    with pytest.raises(ValueError, match="unknown artifact format"):
        export.verify(model, {"pb": paths["tflite"]}, x_test)


# --- atomic writes and failures ----------------------------------------------------------


def _failing_onnx_converter(job):
    with open(job.path("onnx"), "wb") as f:
        f.write(b"half an onnx model")  # a partial artifact, as a crash mid-write leaves
    raise RuntimeError("converter exploded halfway")


def test_failing_converter_raises_naming_format_and_leaves_no_files(trained, tmp_path, monkeypatch):
    model = trained[0]
    monkeypatch.setitem(converters._CONVERTERS, "onnx", _failing_onnx_converter)
    out = tmp_path / "out"
    with pytest.raises(export.ExportError, match=r"'onnx' failed: RuntimeError: converter exploded"):
        export.export_model(model, str(out), formats=("tflite", "onnx"))
    # tflite converted fine but nothing is published when a format fails.
    assert os.listdir(tmp_path) == []

    out.mkdir()
    (out / "model.tflite").write_bytes(b"previous export")
    with pytest.raises(export.ExportError) as info:
        export.export_model(model, str(out), formats=("tflite", "onnx"))
    assert set(info.value.failures) == {"onnx"}
    assert (out / "model.tflite").read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["model.tflite"]


def test_keep_going_exports_the_other_formats_and_reports_the_failure(
    trained, tmp_path, monkeypatch
):
    model, _, x_test, _ = trained
    monkeypatch.setitem(converters._CONVERTERS, "onnx", _failing_onnx_converter)
    out = tmp_path / "out"
    paths = export.export_model(model, str(out), formats=("tflite", "onnx"), keep_going=True)
    assert set(paths) == {"tflite"}
    assert set(paths.failures) == {"onnx"}
    assert "converter exploded halfway" in paths.failures["onnx"]
    assert os.listdir(out) == ["model.tflite"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert export.verify(model, dict(paths), x_test)["tflite"]["passed"]

    monkeypatch.setitem(converters._CONVERTERS, "tflite", _failing_onnx_converter)
    with pytest.raises(export.ExportError, match="every export format failed"):
        export.export_model(model, str(tmp_path / "none"), formats=("tflite",), keep_going=True)
    assert not (tmp_path / "none").exists()


def test_export_replaces_existing_artifacts_and_keeps_other_files(trained, tmp_path):
    model, _, x_test, _ = trained
    out = tmp_path / "out"
    (out / "saved_model").mkdir(parents=True)
    (out / "saved_model" / "stale.txt").write_text("old")
    (out / "model.tflite").write_bytes(b"stale")
    (out / "notes.txt").write_text("keep me")
    paths = export.export_model(model, str(out), formats=("saved_model", "tflite"))
    assert not (out / "saved_model" / "stale.txt").exists()
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(out)) == ["model.tflite", "notes.txt", "saved_model"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    results = export.verify(model, dict(paths), x_test)
    assert results["saved_model"]["passed"] and results["tflite"]["passed"]


# --- bad input ----------------------------------------------------------------------------


def test_unknown_format_is_rejected_listing_valid_ones(trained, tmp_path):
    with pytest.raises(ValueError, match=r"\['tflite_int4'\].*saved_model, tflite, tflite_f16"):
        export.export_model(trained[0], str(tmp_path / "out"), formats=("tflite", "tflite_int4"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "calibration, match",
    [
        (None, "needs calibration data"),
        (np.zeros((8, 10, 10, 1), "float32"), r"shape \(8, 10, 10, 1\).*\(N, 12, 12, 1\)"),
        (np.zeros((8, 12, 12), "float32"), r"shape \(8, 12, 12\)"),
        (np.zeros((8, 12, 12, 1), "uint8"), "dtype uint8"),
        (np.zeros((0, 12, 12, 1), "float32"), "empty"),
        (np.full((2, 12, 12, 1), np.nan, "float32"), "NaN"),
        (tf.data.Dataset.from_tensor_slices(np.zeros((4, 12, 12, 1), "uint8")), "uint8"),
        (tf.data.Dataset.from_tensor_slices(np.zeros((4, 9, 9, 1), "float32")), "do not match"),
        (tf.data.Dataset.from_tensor_slices(np.zeros((4, 12, 12, 1), "float32")).repeat(), "infinite"),
    ],
    ids=["missing", "hw", "rank", "uint8", "empty", "nan", "ds_uint8", "ds_shape", "ds_infinite"],
)
def test_bad_calibration_is_rejected_before_converting(trained, tmp_path, calibration, match):
    with pytest.raises(ValueError, match=match):
        export.export_model(
            trained[0], str(tmp_path / "out"), formats=("tflite_int8",), calibration=calibration
        )
    assert os.listdir(tmp_path) == []


def test_dynamic_spatial_dims_rejected_for_tflite_while_onnx_exports(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_tiny_model(input_shape=(None, None, 1))
    with pytest.raises(ValueError, match=r"need fixed non-batch.*\(None, None, None, 1\)"):
        export.export_model(model, str(tmp_path / "a"), formats=("onnx", "tflite"))
    assert os.listdir(tmp_path) == []
    paths = export.export_model(model, str(tmp_path / "b"), formats=("onnx",))
    for size in (12, 16):
        x = np.random.default_rng(size).uniform(0, 1, (3, size, size, 1)).astype("float32")
        results = export.verify(model, dict(paths), x)
        assert results["onnx"]["max_abs_diff"] <= 1e-4 * results["onnx"]["output_scale"]


def test_unwritable_out_dir_is_a_clear_error(trained, tmp_path):
    model = trained[0]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"out_dir .*a_file.* exists and is not a directory"):
        export.export_model(model, str(blocker), formats=("tflite",))
    with pytest.raises(ValueError, match=r"out_dir .*a_file/out.* cannot be created"):
        export.export_model(model, str(blocker / "out"), formats=("tflite",))


def test_read_only_parent_is_a_clear_error(trained, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the file-parent case covers the path")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="not writable"):
            export.export_model(trained[0], str(locked / "out"), formats=("tflite",))
    finally:
        locked.chmod(0o755)


def test_model_with_two_outputs_is_rejected():
    inputs = keras.Input(INPUT_SHAPE)
    x = layers.Flatten()(inputs)
    model = keras.Model(inputs, [layers.Dense(2)(x), layers.Dense(3)(x)])
    with pytest.raises(ValueError, match="one input and one output.*2 outputs"):
        export.export_model(model, "unused", formats=("tflite",))


def test_bad_opset_is_rejected(trained, tmp_path):
    with pytest.raises(ValueError, match=r"opset must be .*received opset=99"):
        export.export_model(trained[0], str(tmp_path / "out"), formats=("onnx",), opset=99)


# --- latency --------------------------------------------------------------------------------


def test_benchmark_latency_rows_per_artifact_runtime_and_threads(exported):
    paths, _ = exported
    artifacts = {f: paths[f] for f in ("tflite", "tflite_int8", "onnx")}
    rows = export.benchmark_latency(artifacts, INPUT_SHAPE, threads=(1, 2), warmup=2, repeat=10)
    assert [(r["format"], r["threads"]) for r in rows] == [
        (f, t) for f in artifacts for t in (1, 2)
    ]
    # TF runs in a subprocess per thread count (~5-10 s each): one is enough here;
    # the worker's thread setting is tested below.
    rows += export.benchmark_latency(
        {"saved_model": paths["saved_model"]}, INPUT_SHAPE, threads=1, warmup=2, repeat=10
    )
    assert rows[-1]["format"] == "saved_model" and rows[-1]["threads"] == 1
    runtime = {"saved_model": "tensorflow", "onnx": "onnxruntime"}
    for row in rows:
        assert row["runtime"] == runtime.get(row["format"], "litert")
        assert 0 < row["p50_ms"] <= row["p90_ms"]
        assert row["mean_ms"] > 0 and row["std_ms"] >= 0
        assert row["batch_size"] == 1 and row["repeat"] == 10
    sizes = {r["format"]: r["size_bytes"] for r in rows}
    assert sizes["tflite"] == os.path.getsize(paths["tflite"])
    saved = sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(paths["saved_model"]) for f in fs
    )
    assert sizes["saved_model"] == saved


class _FakeRunner:
    """Stands in for a LiteRT/onnxruntime runner; logs each call to a shared list."""

    def __init__(self, fmt, path, num_threads, log):
        self.key = (fmt, num_threads)
        self.runtime = export.RUNTIMES[fmt]
        self._log = log

    def prepare(self, x):
        return x

    def run(self, feed):
        self._log.append(self.key)
        return feed


def test_benchmark_latency_interleaves_every_artifact_in_each_round(tmp_path, monkeypatch):
    from tfkdp.export import latency

    log = []
    monkeypatch.setattr(
        latency, "open_runner", lambda fmt, path, num_threads=None: _FakeRunner(
            fmt, path, num_threads, log
        ),
    )  # fmt: skip
    artifacts = {}
    for fmt in ("tflite", "tflite_int8", "onnx"):
        artifacts[fmt] = tmp_path / f"{fmt}.bin"
        artifacts[fmt].write_bytes(b"x" * 7)
    rows = export.benchmark_latency(artifacts, INPUT_SHAPE, threads=(1, 2), warmup=3, repeat=25)

    cells = [(f, t) for f in artifacts for t in (1, 2)]
    assert [(r["format"], r["threads"]) for r in rows] == cells
    for row in rows:
        assert set(row) >= {
            "format", "runtime", "threads", "batch_size", "p50_ms", "p90_ms", "mean_ms",
            "std_ms", "size_bytes", "path", "repeat",
        }  # fmt: skip
        assert row["repeat"] == 25 and row["rounds"] == 10 and row["size_bytes"] == 7
    # The initial warm-up: `warmup` calls per cell, before any timed block.
    assert sorted(log[: 3 * len(cells)]) == sorted(cells * 3)
    # Then 10 rounds; in each, every cell runs one block: 2 re-warm calls plus its
    # share of the timed calls (25 split over 10 blocks: five of 3, then five of 2).
    rest = log[3 * len(cells):]
    timed = dict.fromkeys(cells, 0)
    for size in (3,) * 5 + (2,) * 5:
        visited = []
        for _ in cells:
            block, rest = rest[: 2 + size], rest[2 + size:]
            assert len(set(block)) == 1, block  # one cell per block
            visited.append(block[0])
            timed[block[0]] += size
        assert sorted(visited) == sorted(cells)
    assert rest == [] and timed == dict.fromkeys(cells, 25)


def test_tf_latency_worker_sets_thread_pools_before_first_op(exported):
    paths, _ = exported
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, "-m", "tfkdp.export._tf_latency", "--saved_model", paths["saved_model"],
         "--input_shape", "12,12,1", "--threads", "2", "--batch_size", "3", "--warmup", "1",
         "--repeat", "3"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert (result["intra_op"], result["inter_op"]) == (2, 1)
    assert len(result["times_ms"]) == 3 and min(result["times_ms"]) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threads": (0,)}, "threads must be an int >= 1"),
        ({"input_shape": (None, 12, 1)}, "input_shape"),
        ({"repeat": 0}, "repeat must be"),
        ({"artifacts": {"keras": "x.keras"}}, "unknown artifact format"),
        ({"artifacts": {"tflite": "/nonexistent/model.tflite"}}, "not found"),
    ],
)
def test_benchmark_latency_rejects_bad_arguments(kwargs, match):
    args = {"artifacts": {"tflite": __file__}, "input_shape": INPUT_SHAPE, **kwargs}
    error = FileNotFoundError if match == "not found" else ValueError
    with pytest.raises(error, match=match):
        export.benchmark_latency(**args)


# --- small pieces -----------------------------------------------------------------------


def test_quantize_and_dequantize_use_scale_and_zero_point():
    q = runners.quantize([-1.0, 0.0, 0.26, 5.0], scale=0.01, zero_point=-3, dtype=np.int8)
    np.testing.assert_array_equal(q, np.array([-103, -3, 23, 127], np.int8))
    np.testing.assert_allclose(
        runners.dequantize(q, scale=0.01, zero_point=-3), [-1.0, 0.0, 0.26, 1.30], atol=1e-6
    )


def test_importing_export_is_lazy_and_has_no_side_effects():
    code = (
        "import os, sys, json\n"
        "import tensorflow, keras\n"
        "before = dict(os.environ); policy = keras.config.dtype_policy().name\n"
        "import export\n"
        "print(json.dumps({'heavy': sorted(m for m in ('tf2onnx', 'onnx', 'onnxruntime',\n"
        "    'ai_edge_litert') if m in sys.modules), 'env_same': dict(os.environ) == before,\n"
        "    'policy_same': keras.config.dtype_policy().name == policy,\n"
        "    'file': export.__file__}))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result == {
        "heavy": [], "env_same": True, "policy_same": True,
        "file": os.path.join(REPO_ROOT, "export", "__init__.py"),
    }  # fmt: skip


# --- tflite_sparse ----------------------------------------------------------------------


def test_tflite_sparse_of_a_weight_pruned_model_is_smaller_and_matches_keras(trained, tmp_path):
    from tfkdp.export._atomic import gzip_size_bytes, tree_size_bytes
    from tfkdp.pruning import unstructured

    model, _, x_test, _ = trained
    masked = unstructured.apply_weight_masks(model, layers=["conv2", "logits"])
    unstructured.WeightPruner(masked, 0.8).prune_to(0.8)
    pruned = unstructured.remove_weight_masks(masked)
    paths = export.export_model(pruned, str(tmp_path / "out"), formats=("tflite", "tflite_sparse"))
    results = export.verify(pruned, dict(paths), x_test)
    reference = pruned.predict(x_test, verbose=0)
    scale = np.max(np.abs(reference))
    # Sparse storage is lossless: the float32 bound (summation order only, ~1e-6 relative).
    assert results["tflite_sparse"]["runtime"] == "litert"
    assert results["tflite_sparse"]["max_abs_diff"] <= 1e-4 * scale
    assert results["tflite_sparse"]["top1_agreement"] == 1.0
    np.testing.assert_allclose(
        _runner_outputs("tflite_sparse", paths["tflite_sparse"], x_test, 16), reference,
        rtol=0, atol=1e-4 * scale,
    )  # fmt: skip
    # conv2 (1152 weights) at 80 % zeros is stored sparse: the file shrinks.
    assert tree_size_bytes(paths["tflite_sparse"]) < tree_size_bytes(paths["tflite"])
    # gzip squeezes the dense file's zeros too
    assert gzip_size_bytes(paths["tflite"]) < tree_size_bytes(paths["tflite"])

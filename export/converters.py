"""`export_model`: one Keras model to SavedModel, TFLite (f32/f16/dynamic/int8/sparse) and ONNX.

(One module of ~540 lines: Keras' own layout, one converter function per
format beside the one entry point and its staging/atomic-rename logic.)

Each format has one converter function in `_CONVERTERS` (keyed by format
name). All converters write into a staging folder created beside `out_dir`;
only artifacts whose conversion finished are moved into `out_dir`, each by a
rename, so `out_dir` never holds a half-written artifact, even if the process
is killed mid-conversion (a killed run leaves at most a `.<out_dir>.tmp-*`
folder beside `out_dir`, never a partial file inside it).

TFLite artifacts are converted from the SavedModel this module writes with
`model.export(..., format="tf_saved_model")`, through
`tf.lite.TFLiteConverter.from_saved_model`, rather than with
`from_keras_model`: for a Keras 3 model `from_keras_model` itself exports a
SavedModel to a hidden temporary folder and converts that (see
`TFLiteKerasModelConverterV2._convert_keras_to_saved_model` in TF 2.21), so
going through our own SavedModel is the same path made explicit. The model is
traced once for all four TFLite variants, the `serving_default` signature and
its named input carry over into the `.tflite` signature, and what LiteRT runs
is exactly what the `saved_model` artifact serves.
"""

import dataclasses
import os
import re
import shutil
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfkdp.export._atomic import tree_size_bytes, write_bytes_atomic
from tfkdp.export._lazy import require

__all__ = [
    "FORMATS",
    "FILENAMES",
    "ExportError",
    "ExportResult",
    "export_model",
    "model_signature",
]

FORMATS = (
    "saved_model", "tflite", "tflite_f16", "tflite_dynamic", "tflite_int8", "tflite_sparse", "onnx",
)

# Where each format lands inside `out_dir`.
FILENAMES = {
    "saved_model": "saved_model",
    "tflite": "model.tflite",
    "tflite_f16": "model_f16.tflite",
    "tflite_dynamic": "model_dynamic.tflite",
    "tflite_int8": "model_int8.tflite",
    "tflite_sparse": "model_sparse.tflite",
    "onnx": "model.onnx",
}

# LiteRT allocates every tensor statically: a `.tflite` whose spatial dims are
# dynamic gets a default input shape of 1×1×C, which on-device callers that do
# not call `resize_tensor_input` run silently on a one-pixel image. So the
# TFLite formats require fixed non-batch dimensions (the batch stays dynamic).
_NEEDS_FIXED_DIMS = ("tflite", "tflite_f16", "tflite_dynamic", "tflite_int8", "tflite_sparse")

# Longest converter message kept in an ExportError (MLIR dumps can be huge;
# the full text stays on the chained exception).
_MAX_MESSAGE = 4000

_TF_NAME = re.compile(r"[^A-Za-z0-9_.\-/]")


class ExportError(RuntimeError):
    """A converter failed.

    Attributes:
        failures: `{format: message}` of every format that failed.
    """

    def __init__(self, message, failures):
        super().__init__(message)
        self.failures = dict(failures)


class ExportResult(dict):
    """`{format: path}` of the exported artifacts, plus the formats that failed.

    With `keep_going=True`, `export_model` returns the formats that exported
    and lists the rest in `failures` (`{format: converter message}`); each
    failure is also logged at error level. Without `keep_going` a failure
    raises `ExportError` instead, so `failures` is then always empty.
    """

    def __init__(self, paths=(), failures=None):
        super().__init__(paths)
        self.failures = dict(failures or {})


@dataclasses.dataclass(frozen=True)
class Signature:
    """The single input of a model: serving name, shape (batch `None`) and dtype."""

    name: str
    shape: tuple
    dtype: str

    def tensor_spec(self):
        return tf.TensorSpec(self.shape, tf.as_dtype(self.dtype), name=self.name)


def model_signature(model):
    """Checks that `model` is a built Keras model with one input and one output.

    Returns:
        A `Signature` for its input: the name (from the `keras.Input`, made a
        valid TF tensor name), the shape with a dynamic batch dimension, and
        the dtype.

    Raises:
        ValueError: if `model` is not a `keras.Model`, is not built, or has
            other than one input and one output.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; received {type(model).__name__}")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(
            f"model {model.name!r} has no defined inputs/outputs; export needs a functional or "
            "Sequential model built on a `keras.Input` (wrap a subclassed model: "
            "`keras.Model(inp := keras.Input(shape), model(inp))`)"
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"export supports models with one input and one output; model {model.name!r} has "
            f"{len(inputs)} inputs and {len(outputs)} outputs"
        )
    tensor = inputs[0]
    name = _TF_NAME.sub("_", tensor.name.split(":")[0]) or "input"
    if not name[0].isalnum():
        name = "input_" + name
    shape = (None,) + tuple(None if d is None else int(d) for d in tensor.shape[1:])
    return Signature(name=name, shape=shape, dtype=str(tensor.dtype))


def _check_formats(formats):
    if isinstance(formats, str):
        formats = (formats,)
    try:
        requested = list(formats)
    except TypeError:
        raise ValueError(
            f"formats must be a sequence of format names from {FORMATS}; received {formats!r}"
        ) from None
    unknown = [f for f in requested if f not in FORMATS]
    if unknown or not requested:
        raise ValueError(
            f"unknown export format(s) {unknown if unknown else requested!r}; "
            f"valid formats are {', '.join(FORMATS)}"
        )
    # Canonical order: the SavedModel comes first because the TFLite
    # converters reuse it.
    return tuple(f for f in FORMATS if f in requested)


def _check_calibration(calibration, signature):
    """Validates calibration data; returns a function that yields one sample at a time."""
    sample_shape = signature.shape[1:]
    if isinstance(calibration, tf.data.Dataset):
        spec = calibration.element_spec
        if isinstance(spec, (tuple, list)):
            spec = spec[0]
        if not isinstance(spec, tf.TensorSpec):
            raise ValueError(
                "a calibration dataset must yield image tensors or (images, labels) tuples; "
                f"its element_spec is {calibration.element_spec!r}"
            )
        if not spec.dtype.is_floating:
            raise ValueError(
                f"calibration data must be preprocessed float inputs; the dataset yields "
                f"{spec.dtype.name} (scale it first, e.g. with tfkdp.data.preprocess)"
            )
        rank = spec.shape.rank
        batched = rank == len(sample_shape) + 1
        if rank is None or rank not in (len(sample_shape), len(sample_shape) + 1):
            raise ValueError(
                f"calibration dataset elements have shape {spec.shape}; the model input is "
                f"{signature.shape} (samples {sample_shape}, batched or not)"
            )
        dims = spec.shape[1:] if batched else spec.shape
        if not tf.TensorShape(sample_shape).is_compatible_with(dims):
            raise ValueError(
                f"calibration dataset elements have shape {spec.shape}; they do not match the "
                f"model input shape {signature.shape}"
            )
        if calibration.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError("the calibration dataset is infinite; pass a finite one (e.g. .take(500))")

        def samples():
            for element in calibration:
                images = element[0] if isinstance(element, (tuple, list)) else element
                images = np.asarray(images, dtype=np.float32)
                for sample in images if batched else images[None]:
                    yield sample[None]

        return samples

    try:
        array = np.asarray(calibration)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"calibration must be a numpy array or a tf.data.Dataset; received "
            f"{type(calibration).__name__} ({error})"
        ) from error
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"calibration data must be preprocessed float inputs (e.g. tfkdp.data.preprocess(x)); "
            f"received dtype {array.dtype}"
        )
    expected = len(sample_shape) + 1
    if array.ndim != expected or not tf.TensorShape(signature.shape).is_compatible_with(array.shape):
        raise ValueError(
            f"calibration data has shape {array.shape}; the model input is {signature.shape} "
            f"so calibration must have shape (N, {', '.join(str(d) for d in sample_shape)})"
        )
    if len(array) == 0:
        raise ValueError("calibration data is empty; pass at least one sample (100-1000 is usual)")
    if not np.all(np.isfinite(array)):
        raise ValueError("calibration data contains NaN or infinite values")
    array = array.astype(np.float32, copy=False)

    def samples():
        for i in range(len(array)):
            yield array[i : i + 1]

    return samples


class _Job:
    """What the converters of one `export_model` call share."""

    def __init__(self, model, signature, out_dir, work_dir, calibration, opset, int8_io,
                 uint8_input=False):  # fmt: skip
        self.model = model
        self.signature = signature
        self.out_dir = out_dir
        self.work_dir = work_dir
        self.calibration = calibration
        self.opset = opset
        self.int8_io = int8_io
        # A baked input scaling: tflite_int8 takes the raw image as uint8.
        self.uint8_input = uint8_input
        self._saved_model = None

    def path(self, fmt):
        return os.path.join(self.out_dir, FILENAMES[fmt])

    def saved_model_dir(self):
        """The SavedModel the TFLite converters start from (exported at most once)."""
        if self._saved_model is None:
            shipped = self.path("saved_model")
            if os.path.isdir(shipped):
                self._saved_model = shipped
            else:
                path = os.path.join(self.work_dir, "saved_model")
                _write_saved_model(self.model, self.signature, path)
                self._saved_model = path
        return self._saved_model


def _write_saved_model(model, signature, path):
    # An explicit signature names the serving input after the keras.Input and
    # keeps the batch dimension dynamic.
    model.export(
        path, format="tf_saved_model", verbose=False, input_signature=[signature.tensor_spec()]
    )


def _convert_saved_model(job):
    _write_saved_model(job.model, job.signature, job.path("saved_model"))


def _tflite_converter(job):
    return tf.lite.TFLiteConverter.from_saved_model(
        job.saved_model_dir(), signature_keys=["serving_default"]
    )


def _convert_tflite(job):
    write_bytes_atomic(job.path("tflite"), _tflite_converter(job).convert())


def _convert_tflite_f16(job):
    converter = _tflite_converter(job)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    write_bytes_atomic(job.path("tflite_f16"), converter.convert())


def _convert_tflite_dynamic(job):
    # Optimize.DEFAULT without representative data = dynamic-range
    # quantisation: int8 weights (tensors of >= 1024 elements), float
    # activations quantised on the fly by the hybrid kernels.
    converter = _tflite_converter(job)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    write_bytes_atomic(job.path("tflite_dynamic"), converter.convert())


def _convert_tflite_int8(job):
    converter = _tflite_converter(job)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([s] for s in job.calibration())
    # Full integer: fail instead of silently keeping float kernels for ops that
    # have no int8 implementation.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if job.uint8_input:
        converter.inference_input_type = tf.uint8
    elif job.int8_io:
        converter.inference_input_type = tf.int8
    if job.int8_io:
        converter.inference_output_type = tf.int8
    flatbuffer = converter.convert()
    if job.uint8_input:
        _check_pixel_input(flatbuffer)
    write_bytes_atomic(job.path("tflite_int8"), flatbuffer)


def _check_pixel_input(flatbuffer):
    """Logs when a uint8-input model's input is not the pixels themselves (scale 1, zero point 0).

    The converter takes the input's quantisation from the calibration
    images' range: 0..255 (real photos nearly always span it) gives scale 1
    and zero point 0, and a device feeds its uint8 pixels unchanged. A
    narrower range gives other values, and the device must quantise with
    them (`round(p / scale) + zero_point`, as `tfkdp.export.open_runner` does).
    """
    interpreter = require("ai_edge_litert.interpreter").Interpreter(model_content=flatbuffer)
    scale, zero_point = interpreter.get_input_details()[0]["quantization"]
    if not (abs(scale - 1.0) < 1e-6 and zero_point == 0):
        logging.warning(
            "tflite_int8 takes uint8 input with scale %g and zero point %d, not the raw pixels "
            "(scale 1, zero point 0): the calibration images do not span 0..255. A device must "
            "feed round(pixel / %g) + %d", scale, zero_point, scale, zero_point,
        )


def _convert_tflite_sparse(job):
    # Float32 with the converter's sparsity encoding: a constant weight whose
    # zeros are numerous enough is stored in TFLite's sparse (CSR-like)
    # format with a DENSIFY op before its consumer. The file shrinks; the
    # kernels that run are the dense ones (see README, "Weight pruning").
    converter = _tflite_converter(job)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    write_bytes_atomic(job.path("tflite_sparse"), converter.convert())


def _convert_onnx(job):
    tf2onnx = require("tf2onnx")
    onnx = require("onnx")
    path = job.path("onnx")
    tf2onnx.convert.from_keras(
        job.model,
        input_signature=(job.signature.tensor_spec(),),
        opset=job.opset,
        output_path=path,
    )
    # tf2onnx converts with continue_on_error=True and leaves ops it cannot
    # map in the graph; the checker (with shape inference) rejects those.
    onnx.checker.check_model(path, full_check=True)


# Format -> converter(job). Tests swap entries to simulate failing converters.
_CONVERTERS = {
    "saved_model": _convert_saved_model,
    "tflite": _convert_tflite,
    "tflite_f16": _convert_tflite_f16,
    "tflite_dynamic": _convert_tflite_dynamic,
    "tflite_int8": _convert_tflite_int8,
    "tflite_sparse": _convert_tflite_sparse,
    "onnx": _convert_onnx,
}


def _check_opset(opset):
    constants = require("tf2onnx").constants
    valid = sorted(v for v in constants.OPSET_TO_IR_VERSION if v >= 9)
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or opset not in valid:
        raise ValueError(
            f"opset must be an ONNX opset tf2onnx supports ({valid[0]}..{valid[-1]}); "
            f"received opset={opset!r}"
        )
    return int(opset)


def _prepare_out_dir(out_dir):
    """Checks `out_dir` can be written; returns (absolute out_dir, its parent)."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ValueError(f"out_dir must be a non-empty path; received out_dir={out_dir!r}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir!r} exists and is not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"out_dir {out_dir!r} cannot be created: its parent {parent!r} cannot be made "
            f"({type(error).__name__}: {error})"
        ) from error
    for path in (parent, out_dir):
        if os.path.isdir(path) and not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"out_dir {out_dir!r} is not writable: {path!r} denies write access")
    return out_dir, parent


def _commit(staged, out_dir, names, trash):
    """Moves finished artifacts from `staged` into `out_dir`, each by a rename."""
    if not os.path.exists(out_dir):
        try:
            os.rename(staged, out_dir)  # one rename publishes every artifact at once
            return
        except OSError:
            if not os.path.isdir(out_dir):  # not a lost race with another writer
                raise
    for name in names:
        src, dst = os.path.join(staged, name), os.path.join(out_dir, name)
        if os.path.isdir(src) or os.path.isdir(dst):
            # A folder cannot be replaced in one rename: move the old one aside
            # first; at every instant `dst` is the old or the new artifact, or absent.
            if os.path.lexists(dst):
                os.rename(dst, os.path.join(trash, name))
            os.rename(src, dst)
        else:
            os.replace(src, dst)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _describe(error):
    message = f"{type(error).__name__}: {error}".strip()
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE // 2] + "\n[...]\n" + message[-_MAX_MESSAGE // 2 :]
    return message


def export_model(
    model,
    out_dir,
    formats=FORMATS,
    calibration=None,
    opset=17,
    keep_going=False,
    int8_io=False,
    bake_scaling=None,
):
    """Exports a Keras model to deployment formats, atomically.

    Formats (`FORMATS`):
    - `saved_model`: `model.export(format="tf_saved_model")`, signature
      `serving_default` whose input is named after the model's `keras.Input`.
    - `tflite`: float32 TFLite.
    - `tflite_f16`: float16 weights (dequantised to float32 at load).
    - `tflite_dynamic`: dynamic-range quantisation: int8 weights, float
      activations quantised per batch at run time.
    - `tflite_int8`: full-integer int8, activation ranges calibrated on
      `calibration`; float32 input/output (quantise/dequantise inside the
      model) unless `int8_io=True`.
    - `tflite_sparse`: float32 TFLite converted with
      `tf.lite.Optimize.EXPERIMENTAL_SPARSITY`: weights with enough zeros
      (weight pruning) are stored in TFLite's sparse format and densified
      at load; smaller file, dense kernels at run time.
    - `onnx`: `tf2onnx.convert.from_keras` at `opset`, checked with
      `onnx.checker.check_model(full_check=True)`.

    Every artifact keeps a dynamic batch dimension. TFLite formats need fixed
    non-batch dimensions (LiteRT allocates tensors statically).

    With `bake_scaling` (a name from `tfkdp.scaling.names()`), the input
    scaling is put in front of the model (`tfkdp.scaling.with_scaling`, a
    `ScaleInputs` layer) and every artifact takes raw 0–255 pixels: float32
    for the float formats, uint8 for `tflite_int8` (its input scale is 1 and
    zero point 0 when the calibration images span 0..255; otherwise a warning
    gives the values). Calibration data are then raw pixels too, and
    `verify(..., bake_scaling=...)` checks the artifacts on raw images
    against the Keras model on scaled ones.

    Args:
        model: a functional or Sequential `keras.Model` with one input and one
            output, in inference mode semantics (BN uses moving statistics).
        out_dir: folder to write into; created if missing. Artifacts are named
            by `FILENAMES` (`saved_model/`, `model.tflite`, `model_f16.tflite`,
            `model_dynamic.tflite`, `model_int8.tflite`, `model_sparse.tflite`,
            `model.onnx`); an
            artifact already there is replaced, others are left alone.
        formats: a sequence of names from `FORMATS` (or one name). The default,
            every format, includes `tflite_int8`, which needs `calibration`.
        calibration: representative inputs for `tflite_int8`: a float numpy
            array `(N, *input_shape)` preprocessed exactly as the model's
            training inputs (100-1000 real samples is usual; every sample is
            used), or a finite `tf.data.Dataset` of such images (batched or
            not, optionally as `(images, labels)`).
        opset: ONNX opset for `onnx`.
        keep_going: if a converter fails, keep exporting the other formats and
            report the failure in the result's `failures` instead of raising.
        int8_io: `tflite_int8` takes and returns int8 tensors (quantise the
            input with the input tensor's scale/zero point); with
            `bake_scaling` the input stays uint8 and the output is int8.
        bake_scaling: `None` (artifacts take the model's inputs), or the
            input scaling the model was trained with, baked into the
            artifacts so they take raw 0–255 images.

    Returns:
        An `ExportResult`: a dict `{format: absolute path}` of the exported
        artifacts with a `failures` attribute `{format: message}`.

    Raises:
        ValueError: for an unknown format (listing the valid ones), a model
            with other than one input/output, dynamic non-batch dimensions
            with a TFLite format, `tflite_int8` without calibration, calibration
            data of the wrong shape or dtype, a bad opset, an `out_dir` that
            cannot be written, or an unknown `bake_scaling` (listing the valid
            names).
        ExportError: if a converter fails (naming the format and the
            converter's message); nothing is written to `out_dir` then. With
            `keep_going=True`, only if every format failed.
        ImportError: if `onnx` is requested and tf2onnx/onnx is missing.

    Example:
        >>> paths = export_model(model, tmp + "/out", formats=("tflite", "onnx"))
        >>> sorted(paths)
        ['onnx', 'tflite']
    """
    formats = _check_formats(formats)
    if bake_scaling is not None:
        from tfkdp import scaling

        model_signature(model)  # one input and one output, before wrapping
        model = scaling.with_scaling(model, bake_scaling)
    signature = model_signature(model)
    dynamic = [i + 1 for i, d in enumerate(signature.shape[1:]) if d is None]
    needs_fixed = [f for f in formats if f in _NEEDS_FIXED_DIMS]
    if dynamic and needs_fixed:
        raise ValueError(
            f"format(s) {needs_fixed} need fixed non-batch input dimensions, but input "
            f"{signature.name!r} of model {model.name!r} has shape {signature.shape} (dynamic "
            f"axes {dynamic}). Rebuild the model on a fixed keras.Input(shape=...), or export "
            "only saved_model/onnx"
        )
    if "tflite_int8" in formats and calibration is None:
        raise ValueError(
            "format 'tflite_int8' needs calibration data: pass calibration= a float array "
            f"of shape (N, {', '.join(str(d) for d in signature.shape[1:])}) of real inputs"
        )
    samples = None if calibration is None else _check_calibration(calibration, signature)
    if "onnx" in formats:
        opset = _check_opset(opset)
    out_dir, parent = _prepare_out_dir(out_dir)

    try:
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    except OSError as error:
        raise ValueError(
            f"out_dir {out_dir!r} is not writable: cannot create a staging folder in {parent!r} "
            f"({type(error).__name__}: {error})"
        ) from error
    try:
        staged = os.path.join(staging, "out")
        work = os.path.join(staging, "work")
        trash = os.path.join(staging, "old")
        for folder in (staged, work, trash):
            os.mkdir(folder)
        job = _Job(model, signature, staged, work, samples, opset, bool(int8_io),
                   uint8_input=bake_scaling is not None)  # fmt: skip
        done, failures = [], {}
        for fmt in formats:
            start = time.perf_counter()
            try:
                _CONVERTERS[fmt](job)
            except Exception as error:  # noqa: BLE001 - any converter error names the format
                _remove(job.path(fmt))  # leave no partial artifact in the staging folder
                message = _describe(error)
                if not keep_going:
                    raise ExportError(
                        f"export to {fmt!r} failed: {message}", {fmt: message}
                    ) from error
                logging.error("export to %r failed (keep_going=True): %s", fmt, message)
                failures[fmt] = message
                continue
            done.append(fmt)
            logging.info(
                "exported %s (%d bytes) in %.1f s",
                fmt, tree_size_bytes(job.path(fmt)), time.perf_counter() - start,
            )
        if not done:
            raise ExportError(
                "every export format failed: "
                + "; ".join(f"{fmt}: {msg}" for fmt, msg in failures.items()),
                failures,
            )
        _commit(staged, out_dir, [FILENAMES[f] for f in done], trash)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult({f: os.path.join(out_dir, FILENAMES[f]) for f in done}, failures)

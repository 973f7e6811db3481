"""Run an exported artifact on its own runtime: TF (SavedModel), LiteRT (.tflite), onnxruntime.

A runner splits one inference into `prepare` (numpy floats to what the
runtime takes: quantised int8 for int8-input TFLite, a `tf.Tensor` for TF),
`run` (the runtime call, returning the raw numpy output) and `postprocess`
(dequantise to float32). Latency is measured on `run` alone; verification
uses the whole chain.
"""

import os

import numpy as np
import tensorflow as tf

from tfkdp.export._lazy import require

__all__ = ["RUNTIMES", "open_runner", "quantize", "dequantize"]

# Format -> the runtime it is verified and benchmarked on.
RUNTIMES = {
    "saved_model": "tensorflow",
    "tflite": "litert",
    "tflite_f16": "litert",
    "tflite_dynamic": "litert",
    "tflite_int8": "litert",
    "tflite_sparse": "litert",
    "onnx": "onnxruntime",
}


def quantize(x, scale, zero_point, dtype):
    """Float to integer with a tensor's affine parameters: round(x / scale) + zero_point."""
    info = np.iinfo(dtype)
    q = np.round(np.asarray(x, np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q, scale, zero_point):
    """Integer to float32: (q - zero_point) * scale."""
    return ((np.asarray(q, np.float64) - zero_point) * scale).astype(np.float32)


class Runner:
    """One loaded artifact. Subclasses implement `prepare` and `run`."""

    runtime = None

    def prepare(self, x):
        raise NotImplementedError(f"{type(self).__name__} must implement prepare()")

    def run(self, feed):
        raise NotImplementedError(f"{type(self).__name__} must implement run()")

    def postprocess(self, raw):
        return np.asarray(raw, dtype=np.float32)

    def __call__(self, x):
        return self.postprocess(self.run(self.prepare(x)))


class LiteRTRunner(Runner):
    """A `.tflite` file on the LiteRT interpreter (XNNPACK delegate, LiteRT's default)."""

    runtime = "litert"

    def __init__(self, path, num_threads=None):
        interpreter_module = require("ai_edge_litert.interpreter")
        self.interpreter = interpreter_module.Interpreter(model_path=path, num_threads=num_threads)
        inputs = self.interpreter.get_input_details()
        outputs = self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{path!r} has {len(inputs)} inputs and {len(outputs)} outputs; one of each expected"
            )
        self._input, self._output = inputs[0], outputs[0]
        self._shape = None
        self.input_dtype = np.dtype(self._input["dtype"])
        self.output_dtype = np.dtype(self._output["dtype"])

    def prepare(self, x):
        x = np.asarray(x)
        if np.issubdtype(self.input_dtype, np.integer):
            scale, zero_point = self._input["quantization"]
            x = quantize(x, scale, zero_point, self.input_dtype)
        else:
            x = x.astype(self.input_dtype, copy=False)
        if self._shape != x.shape:
            # The batch dimension is dynamic (-1 in shape_signature); LiteRT
            # needs the concrete shape before allocating.
            self.interpreter.resize_tensor_input(self._input["index"], list(x.shape))
            self.interpreter.allocate_tensors()
            self._shape = x.shape
        return np.ascontiguousarray(x)

    def run(self, feed):
        self.interpreter.set_tensor(self._input["index"], feed)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._output["index"])

    def postprocess(self, raw):
        if np.issubdtype(self.output_dtype, np.integer):
            scale, zero_point = self._output["quantization"]
            return dequantize(raw, scale, zero_point)
        return np.asarray(raw, dtype=np.float32)


class OnnxRuntimeRunner(Runner):
    """A `.onnx` file on onnxruntime's CPUExecutionProvider, all graph optimisations on."""

    runtime = "onnxruntime"

    def __init__(self, path, num_threads=None):
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only; ORT warns about unused initialisers
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{path!r} has {len(inputs)} inputs and {len(outputs)} outputs; one of each expected"
            )
        self._input_name, self._output_name = inputs[0].name, outputs[0].name

    def prepare(self, x):
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))

    def run(self, feed):
        return self.session.run([self._output_name], {self._input_name: feed})[0]


class TensorFlowRunner(Runner):
    """A SavedModel's `serving_default` signature, called eagerly from Python."""

    runtime = "tensorflow"

    def __init__(self, path):
        self._loaded = tf.saved_model.load(path)  # the signature needs its owner alive
        if "serving_default" not in self._loaded.signatures:
            raise ValueError(
                f"SavedModel {path!r} has no serving_default signature "
                f"(found {sorted(self._loaded.signatures)})"
            )
        self._function = self._loaded.signatures["serving_default"]
        specs = self._function.structured_input_signature[1]
        outputs = self._function.structured_outputs
        if len(specs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"SavedModel {path!r} serving_default has {len(specs)} inputs and "
                f"{len(outputs)} outputs; one of each expected"
            )
        (self._input_name, spec), = specs.items()
        self._dtype = spec.dtype
        self._output_name = next(iter(outputs))

    def prepare(self, x):
        return tf.constant(np.asarray(x), dtype=self._dtype)

    def run(self, feed):
        return self._function(**{self._input_name: feed})[self._output_name].numpy()


def open_runner(fmt, path, num_threads=None):
    """Loads artifact `path` of format `fmt` on its runtime (see `RUNTIMES`).

    Args:
        fmt: a format name from `export.FORMATS`.
        path: the artifact (file, or folder for `saved_model`).
        num_threads: LiteRT `num_threads` / onnxruntime `intra_op_num_threads`
            (`None`: the runtime's default). Ignored for TF, whose thread
            pools are process-wide (see `export.benchmark_latency`).

    Returns:
        A `Runner`; `runner(x)` maps a float batch to float32 outputs.

    Raises:
        ValueError: for an unknown format.
        FileNotFoundError: if `path` does not exist.
    """
    if fmt not in RUNTIMES:
        raise ValueError(f"unknown artifact format {fmt!r}; valid formats are {', '.join(RUNTIMES)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{fmt} artifact not found: {path!r}")
    runtime = RUNTIMES[fmt]
    if runtime == "litert":
        return LiteRTRunner(path, num_threads=num_threads)
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(path, num_threads=num_threads)
    return TensorFlowRunner(path)

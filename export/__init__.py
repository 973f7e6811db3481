"""export: SavedModel, TFLite (f32, f16, dynamic, int8, sparse) and ONNX from any Keras 3 model.

Each artifact is verified against the Keras model on its own runtime and can
be benchmarked there:

    paths = export.export_model(model, "out", calibration=x_calib)
    export.verify(model, paths, x_test, y_test)        # raises VerificationError
    rows = export.benchmark_latency(paths, (28, 28, 1), threads=(1, 2))

Importing `export` has no side effects, and does not import tf2onnx, onnx,
onnxruntime or LiteRT: each is imported when a format first needs it.
"""

from tfkdp.export.converters import FILENAMES, FORMATS, ExportError, ExportResult, export_model
from tfkdp.export.latency import benchmark_latency
from tfkdp.export.runners import RUNTIMES, open_runner
from tfkdp.export.verify import DEFAULT_TOLERANCES, VerificationError, verify

__all__ = [
    "DEFAULT_TOLERANCES",
    "FILENAMES",
    "FORMATS",
    "RUNTIMES",
    "ExportError",
    "ExportResult",
    "VerificationError",
    "benchmark_latency",
    "export_model",
    "open_runner",
    "verify",
]

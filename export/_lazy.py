"""Imports of the optional runtimes on first use, with an install hint."""

import importlib

# module -> pip distribution that provides it
_PIP_NAMES = {
    "tf2onnx": "tf2onnx",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "ai_edge_litert.interpreter": "ai-edge-litert",
}


def require(module):
    """Imports `module`, or raises ImportError saying which package to install.

    tf2onnx, onnxruntime and LiteRT each take seconds to import and are only
    needed for some formats, so `import export` does not import them.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = _PIP_NAMES.get(module, module.split(".")[0])
        raise ImportError(
            f"{module!r} is needed for this export format but could not be imported "
            f"({error}). Install it with `pip install {package}`."
        ) from error

"""The runtimes tfkdp measures latency on, their versions, and where measurements are cached.

Both the latency cost model (`tfkdp.pruning.latency_model`) and the channel
alignment probe (`tfkdp.pruning.alignment`) time artifacts on these runtimes
and key their on-disk caches by the runtime's package version, so a new
runtime release is measured afresh.

Reference: LiteRT (https://ai.google.dev/edge/litert) and ONNX Runtime
(https://onnxruntime.ai) Python packages.
"""

import os

__all__ = ["RUNTIMES", "cache_root", "runtime_version"]

#: runtime name -> export format whose artifact it runs.
RUNTIMES = {"litert": "tflite", "onnxruntime": "onnx"}
_PACKAGES = {"litert": "ai-edge-litert", "onnxruntime": "onnxruntime"}


def cache_root():
    """`$TFKDP_CACHE`, else `~/.cache/tfkdp`: where tfkdp keeps what it measured on this machine."""
    return os.environ.get("TFKDP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tfkdp")


def runtime_version(runtime):
    """The installed version of `runtime`'s Python package, or None when it is not installed."""
    from importlib import metadata

    if runtime not in _PACKAGES:
        raise ValueError(f"runtime must be one of {sorted(_PACKAGES)}; received runtime={runtime!r}")
    try:
        return metadata.version(_PACKAGES[runtime])
    except metadata.PackageNotFoundError:
        return None

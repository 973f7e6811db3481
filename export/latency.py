"""`benchmark_latency`: per-inference latency of exported artifacts on their runtimes.

Thread control per runtime:
- LiteRT: `Interpreter(num_threads=n)` (XNNPACK, LiteRT's default delegate).
- onnxruntime: `intra_op_num_threads=n`, `inter_op_num_threads=1`,
  `ORT_ENABLE_ALL`, CPUExecutionProvider.
- TensorFlow (SavedModel, the reference): TF's thread pools are created once
  per process, when the first op runs, and
  `tf.config.threading.set_intra_op_parallelism_threads` raises after that.
  In a process that already uses TF (any Keras user) it cannot change, so each
  thread count is measured in a fresh Python subprocess
  (`python -m tfkdp.export._tf_latency`) that sets intra-op threads to `n` and
  inter-op threads to 1 before its first op. That costs a TF import
  (~5-10 s) per thread count but measures what it says.

Interleaving: load from other processes comes and goes, and timing each
artifact in one block charges a burst of it to whichever artifact ran then
(a loaded demo machine once reported int8 "slower" than float32). The
in-process runtimes (LiteRT, onnxruntime) are therefore timed in `rounds`
blocks: every round visits every (artifact, thread count) once, in a seeded
shuffled order, and each block re-warms its runner with two untimed calls.
A percentile over all blocks then compares artifacts under the same load. TF
runs in its own subprocess and cannot be interleaved with them.
"""

import gc
import json
import os
import subprocess
import sys
import time

import numpy as np

from tfkdp.export._atomic import tree_size_bytes
from tfkdp.export.runners import RUNTIMES, open_runner

__all__ = ["benchmark_latency", "runtime_versions", "time_calls", "summarize"]

# The folder holding the `tfkdp` package (the repository, or site-packages), for the
# subprocess' import path. This module lives at tfkdp/export/latency.py.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Interleaved blocks per measurement (fewer when `repeat` is smaller), and the
# untimed calls that re-warm a runner's caches at the start of each block.
_ROUNDS = 10
_BLOCK_WARMUP = 2


def time_calls(function, feed, warmup, repeat):
    """Calls `function(feed)` `warmup` times untimed, then `repeat` times timed.

    Returns:
        A float64 array of `repeat` wall times in milliseconds.
    """
    for _ in range(warmup):
        function(feed)
    times = np.empty(repeat, dtype=np.float64)
    # A garbage-collection pause inside a timed call is Python's cost, not the
    # runtime's.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeat):
            start = time.perf_counter()
            function(feed)
            times[i] = time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return times * 1e3


def summarize(times_ms):
    """p50, p90, mean and std (population) of a latency sample, in ms."""
    times_ms = np.asarray(times_ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(times_ms, 50)),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "mean_ms": float(np.mean(times_ms)),
        "std_ms": float(np.std(times_ms)),
    }


def runtime_versions():
    """Installed versions of the converters and runtimes (None when missing), for reports."""
    from importlib import metadata

    versions = {}
    for package in ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; received {name}={value!r}")
    return int(value)


def _benchmark_input(input_shape, batch_size, seed, input_scaling="unit", raw_pixels=False):
    """Seeded noise images: integer pixels in [0, 255], scaled as the model's inputs are.

    `raw_pixels`: the pixels as float32, for artifacts with a baked scaling.
    Latency of these dense CNN kernels does not depend on the values; the
    range matters only to int8 inputs, which clip to their calibrated range.
    """
    from tfkdp import scaling

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(batch_size, *input_shape)).astype(np.float32)
    if raw_pixels:
        return pixels
    return np.asarray(scaling.get(input_scaling)(pixels), np.float32)


def _tf_times(path, input_shape, threads, batch_size, warmup, repeat, seed, input_scaling="unit",
              raw_pixels=False):  # fmt: skip
    command = [
        sys.executable, "-m", "tfkdp.export._tf_latency",
        "--saved_model", os.fspath(path),
        "--input_shape", ",".join(str(d) for d in input_shape),
        "--threads", str(threads),
        "--batch_size", str(batch_size),
        "--warmup", str(warmup),
        "--repeat", str(repeat),
        "--seed", str(seed),
        "--input_scaling", str(input_scaling),
        *(["--raw_pixels"] if raw_pixels else []),
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)  # noqa: S603
    if completed.returncode != 0:
        raise RuntimeError(
            f"TF latency subprocess for {path!r} at {threads} thread(s) failed "
            f"(exit {completed.returncode}): {completed.stderr[-3000:]}"
        )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"TF latency subprocess printed no result; stdout: {completed.stdout[-2000:]}")
    return np.asarray(json.loads(lines[-1])["times_ms"], dtype=np.float64)


def benchmark_latency(
    artifacts, input_shape, threads=(1,), batch_size=1, warmup=20, repeat=200, seed=0,
    input_scaling="unit", bake_scaling=None,
):
    """Measures per-inference latency of each artifact on its runtime, per thread count.

    One inference = feeding a prepared input batch, running it and fetching
    the output as a numpy array (`set_tensor` + `invoke` + `get_tensor` on
    LiteRT, `session.run` on onnxruntime, the serving function call plus
    `.numpy()` on TF). The input is seeded noise pixels in [0, 255] scaled
    by `input_scaling` (the scaling the model trained with), or the raw
    pixels for artifacts with `bake_scaling` (quantised once, outside the
    timing, for integer-input models). See the module docstring for
    how threads are controlled per runtime; TF runs in a subprocess.

    Args:
        artifacts: `{format: path}`, e.g. the result of `export_model`; a key
            may carry a label, `"label:format"` (e.g. `"teacher:tflite"`), to
            time two artifacts of one format in the same interleaved run.
        input_shape: shape of one sample without the batch dimension, e.g.
            `(28, 28, 1)`; must be fully defined.
        threads: thread counts to measure, e.g. `(1, 2)`.
        batch_size: samples per inference.
        warmup: untimed calls before timing (first calls allocate and pack weights).
        repeat: timed calls.
        seed: seed of the input noise.
        input_scaling: the model's input scaling (`tfkdp.scaling.names()`;
            `"unit"`: [0, 1]).
        bake_scaling: the scaling baked into the artifacts
            (`export_model(..., bake_scaling=...)`); they then get raw pixels.

    Returns:
        A list of rows, one per artifact × thread count: `format`, `label`
            (the key's label, or None), `runtime`,
        `threads`, `batch_size`, `p50_ms`, `p90_ms`, `mean_ms`, `std_ms`
        (milliseconds per inference), `size_bytes` (file size, or total size
        of the SavedModel folder), `path`, `repeat`, `rounds` (interleaved
        blocks the `repeat` calls were split into; 1 for TF).

    Raises:
        ValueError: for an unknown format, a bad shape, thread count,
            batch size, warmup, repeat or scaling name.
        FileNotFoundError: if an artifact is missing.
        RuntimeError: if the TF subprocess fails.

    Example:
        >>> from tfkdp.export import export_model
        >>> paths = export_model(model, tmp + "/out", formats=("tflite",))
        >>> rows = benchmark_latency(paths, (12, 12, 1), threads=(1,), repeat=20)
        >>> [(r["format"], r["threads"], r["p50_ms"] > 0) for r in rows]
        [('tflite', 1, True)]
    """
    if not isinstance(artifacts, dict) or not artifacts:
        raise ValueError(f"artifacts must be a non-empty {{format: path}} dict; received {artifacts!r}")
    unknown = [f for f in artifacts if _format_of(f) not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown artifact format(s) {unknown}; valid formats are {', '.join(RUNTIMES)}")
    try:
        input_shape = tuple(_check_positive_int("input_shape dim", d) for d in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a tuple of ints; received {input_shape!r}") from None
    if not input_shape:
        raise ValueError("input_shape must have at least one dimension, e.g. (28, 28, 1)")
    if isinstance(threads, (int, np.integer)):
        threads = (threads,)
    threads = tuple(_check_positive_int("threads", t) for t in threads)
    if not threads:
        raise ValueError("threads must list at least one thread count, e.g. (1, 2)")
    batch_size = _check_positive_int("batch_size", batch_size)
    warmup = _check_positive_int("warmup", warmup, minimum=0)
    repeat = _check_positive_int("repeat", repeat)
    for fmt, path in artifacts.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{fmt} artifact not found: {path!r}")

    raw_pixels = bake_scaling is not None
    if raw_pixels:
        from tfkdp import scaling

        input_scaling = scaling.get(bake_scaling).name
    x = _benchmark_input(input_shape, batch_size, seed, input_scaling, raw_pixels)
    rounds = min(_ROUNDS, repeat)
    cells = [(fmt, os.fspath(path), n) for fmt, path in artifacts.items() for n in threads]
    times, calls = {}, {}
    try:
        for fmt, path, n in cells:
            if RUNTIMES[_format_of(fmt)] != "tensorflow":
                runner = open_runner(_format_of(fmt), path, num_threads=n)
                calls[(fmt, n)] = (runner.run, runner.prepare(x))
        times.update(_interleaved_times(calls, warmup, repeat, rounds, seed))
    finally:
        runner = None
        calls.clear()  # free interpreters and sessions before TF's subprocess runs
    for fmt, path, n in cells:
        if RUNTIMES[_format_of(fmt)] == "tensorflow":
            times[(fmt, n)] = _tf_times(path, input_shape, n, batch_size, warmup, repeat, seed,
                                        input_scaling, raw_pixels)  # fmt: skip
    return [
        {
            "format": _format_of(fmt),
            "label": fmt.rpartition(":")[0] or None,
            "runtime": RUNTIMES[_format_of(fmt)],
            "threads": n,
            "batch_size": batch_size,
            **summarize(times[(fmt, n)]),
            "size_bytes": int(tree_size_bytes(path)),
            "path": path,
            "repeat": repeat,
            "rounds": 1 if RUNTIMES[_format_of(fmt)] == "tensorflow" else rounds,
        }
        for fmt, path, n in cells
    ]


def _format_of(key):
    """The format of an artifact key, `"format"` or `"label:format"`."""
    return key.rpartition(":")[2]


def _interleaved_times(calls, warmup, repeat, rounds, seed):
    """Times every `function(feed)` of `calls` in `rounds` interleaved blocks.

    Args:
        calls: `{key: (function, feed)}`.
        warmup: untimed calls per key before the first round.
        repeat: timed calls per key in all, split as evenly as possible
            over the rounds.
        rounds: blocks per key; each round visits every key once, in an
            order shuffled by `seed`.
        seed: seed of the visiting order.

    Returns:
        `{key: float64 array of repeat times in ms}`.
    """
    for function, feed in calls.values():
        time_calls(function, feed, warmup, 0)
    blocks = [len(b) for b in np.array_split(np.arange(repeat), rounds)]
    samples = {key: [] for key in calls}
    order = list(calls)
    rng = np.random.default_rng(seed)
    for block in blocks:
        rng.shuffle(order)
        for key in order:
            function, feed = calls[key]
            samples[key].append(time_calls(function, feed, _BLOCK_WARMUP, block))
    return {key: np.concatenate(parts) for key, parts in samples.items()}

"""Which channel alignment the target runtime rewards: `round_to="auto"`, from measurement.

Kernels of device runtimes work on blocks of channels (XNNPACK's float32
convolutions on x86 compute 8 or 16 output channels at a time, by the vector
width), so a pruned layer with 37 channels can cost as much as one with 40.
`measure_alignment(runtime, threads)` times a probe, a 3×3 convolution
from 64 to c channels followed by a 1×1 convolution back to 64 (c is the
pruned count on both sides of a channel group), for channel counts c of each
alignment a ∈ {1, 2, 4, 8, 16} (c a multiple of a and not of 2a, all in
33..64), in interleaved blocks, and compares the median latency per MAC of
each alignment's counts. `choose_alignment` picks the **smallest alignment
whose latency per MAC is within `tolerance` (5 %) of the best one**: the
coarsest rounding only when the runtime pays for it, because every step of
coarser rounding leaves the budget allocation less freedom.

The result is cached on disk (`$TFKDP_CACHE/alignment` or
`~/.cache/tfkdp/alignment`), keyed by runtime, its version, threads and the
CPU model, so it is measured once per machine (about 16 small conversions).

Reference:
    XNNPACK's micro-kernel tiling (github.com/google/XNNPACK, `gemm` and
    `igemm` kernels with NR = 8 / 16 output channels); choosing counts the
    kernels reward is also NVIDIA's "channels a multiple of 8" guidance.
    The probe and the selection rule are ours.
"""

import hashlib
import json
import os
import platform
import tempfile
import time

import numpy as np
from absl import logging

from tfkdp import checks
from tfkdp.pruning.runtimes import RUNTIMES, cache_root, runtime_version

__all__ = [
    "CANDIDATES",
    "cpu_model",
    "choose_alignment",
    "measure_alignment",
    "probe_counts",
    "resolve_round_to",
]

#: Alignments `round_to="auto"` chooses from.
CANDIDATES = (1, 2, 4, 8, 16)
_VERSION = 1
_SIZE = 16  # probe feature map: 16×16×64


def probe_counts(candidates=CANDIDATES, low=33, high=64, per_alignment=4):
    """`{a: [c, ...]}`: up to `per_alignment` channel counts in [low, high] of exact alignment a.

    c is a multiple of a and, except for the largest candidate, not of 2a,
    spread evenly over the range so every alignment sees counts of similar size.
    """
    candidates = sorted(int(a) for a in candidates)
    out = {}
    for a in candidates:
        counts = [
            c for c in range(low, high + 1) if c % a == 0 and (a == candidates[-1] or c % (2 * a))
        ]
        if not counts:
            raise ValueError(f"no channel count in [{low}, {high}] has alignment {a}")
        idx = np.linspace(0, len(counts) - 1, min(per_alignment, len(counts))).round().astype(int)
        out[a] = [counts[i] for i in sorted(set(idx))]
    return out


def choose_alignment(per_mac, tolerance=0.05):
    """The smallest alignment whose cost per MAC is within `tolerance` of the cheapest.

    Args:
        per_mac: `{alignment: median latency per MAC}` (any consistent unit).
        tolerance: relative slack, e.g. 0.05 for 5 %.

    Returns:
        An int from `per_mac`'s keys.

    Example:
        >>> choose_alignment({1: 1.30, 2: 1.21, 4: 1.03, 8: 1.00, 16: 0.99})
        4
    """
    if not per_mac:
        raise ValueError("choose_alignment needs at least one alignment; received {}")
    checks.check_number("tolerance", tolerance, 0)
    best = min(per_mac.values())
    return min(int(a) for a, v in per_mac.items() if v <= best * (1.0 + tolerance))


def cpu_model():
    """The CPU model name (`/proc/cpuinfo`, else `platform`): part of the cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_cache_dir():
    """`$TFKDP_CACHE/alignment`, else `~/.cache/tfkdp/alignment`."""

    return os.path.join(cache_root(), "alignment")


def _probe(channels):
    import keras

    inputs = keras.Input((_SIZE, _SIZE, 64))
    x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(64, 1)(x)
    return keras.Model(inputs, outputs)


def _probe_macs(channels):
    return _SIZE * _SIZE * (9 * 64 * channels + channels * 64)


def measure_alignment(runtime="litert", threads=1, counts=None, repeat=60, tolerance=0.05,
                      cache_dir=None, seed=0):  # fmt: skip
    """Measures which alignment of channel counts `runtime` rewards (cached).

    Args:
        runtime: `"litert"` (float32 TFLite on XNNPACK) or `"onnxruntime"`.
        threads: the runtime's thread count.
        counts: `{alignment: [channel counts]}` to time (default `probe_counts()`).
        repeat: timed runs per probe model.
        tolerance: see `choose_alignment`.
        cache_dir: where results are kept; `None` for `default_cache_dir()`,
            `False` to neither read nor write a cache.
        seed: input and interleaving seed.

    Returns:
        `{"round_to": a, "per_mac_ns": {a: ns per MAC}, "measured_ms": {c: p50 ms},
        "runtime", "threads", "version", "cpu", "seconds", "cached"}`.
    """

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {sorted(RUNTIMES)}; received runtime={runtime!r}")
    checks.check_int("threads", threads, 1)
    checks.check_int("repeat", repeat, 1)
    counts = (
        probe_counts()
        if counts is None
        else {int(a): [int(c) for c in cs] for a, cs in counts.items()}
    )
    version = runtime_version(runtime)
    cpu = cpu_model()
    key_payload = json.dumps([runtime, version, int(threads), cpu, counts, _VERSION],
                             sort_keys=True)  # fmt: skip
    key = hashlib.sha256(key_payload.encode()).hexdigest()[:24]
    path = None
    if cache_dir is not False:
        path = os.path.join(cache_dir or default_cache_dir(), f"{runtime}-{key}.json")
        if os.path.exists(path):
            try:
                with open(path) as f:
                    cached = json.load(f)
                cached["cached"] = True
                return cached
            except (OSError, ValueError):
                pass
    start = time.time()
    measured = _time_probes(sorted({c for cs in counts.values() for c in cs}), runtime, threads,
                            repeat, seed)  # fmt: skip
    per_mac = {
        a: float(np.median([measured[c] / _probe_macs(c) for c in cs])) * 1e6
        for a, cs in counts.items()
    }
    result = {
        "round_to": choose_alignment(per_mac, tolerance), "tolerance": tolerance,
        "per_mac_ns": {str(a): v for a, v in per_mac.items()},
        "measured_ms": {str(c): v for c, v in measured.items()},
        "runtime": runtime, "threads": int(threads), "version": version, "cpu": cpu,
        "seconds": time.time() - start, "cached": False,
    }  # fmt: skip
    logging.info("round_to=auto: %s with %d thread(s) rewards multiples of %d (ns per MAC by "
                 "alignment: %s); measured in %.1f s", runtime, threads, result["round_to"],
                 {a: round(v, 4) for a, v in per_mac.items()}, result["seconds"])  # fmt: skip
    if path is not None:
        from tfkdp.export._atomic import write_json_atomic

        os.makedirs(os.path.dirname(path), exist_ok=True)  # a fresh machine has no cache folder yet
        write_json_atomic(path, dict(result, cached=None))
    return result


def _time_probes(channel_counts, runtime, threads, repeat, seed):
    """p50 ms of the probe at each channel count, timed in interleaved blocks."""
    from tfkdp.export import latency as latency_lib
    from tfkdp.export.converters import export_model
    from tfkdp.export.runners import open_runner

    fmt = RUNTIMES[runtime]
    x = np.random.default_rng(seed).uniform(size=(1, _SIZE, _SIZE, 64)).astype(np.float32)
    calls = {}
    with tempfile.TemporaryDirectory(prefix="tfkdp-alignment-") as tmp:
        for c in channel_counts:
            paths = export_model(_probe(c), os.path.join(tmp, str(c)), formats=(fmt,))
            runner = open_runner(fmt, paths[fmt], num_threads=threads)
            calls[c] = (runner.run, runner.prepare(x))
        times = latency_lib._interleaved_times(calls, 5, repeat, min(10, repeat), seed)
        calls.clear()
    return {c: float(np.percentile(times[c], 50)) for c in channel_counts}


def resolve_round_to(round_to, runtime="litert", threads=1, **kwargs):
    """`round_to` as an int: itself, or `measure_alignment(...)["round_to"]` for `"auto"`.

    Raises:
        ValueError: for anything but `"auto"` or a positive integer (strings of
            digits, as flags give them, are accepted).
    """
    if isinstance(round_to, str):
        if round_to.strip().lower() == "auto":
            return int(measure_alignment(runtime, threads, **kwargs)["round_to"])
        if round_to.strip().isdigit():
            round_to = int(round_to)
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ValueError(
            f"round_to must be 'auto' or a positive integer; received round_to={round_to!r}"
        )
    return int(round_to)

"""A latency cost model: predicted milliseconds of the stripped model for any plan.

MACs are a poor proxy for time on a device runtime: a depthwise convolution
does few MACs per millisecond, a 1×1 convolution many, and every call has a
fixed cost. `LatencyModel(model, runtime, threads)` measures the *whole*
model stripped at a few widths on the target runtime (LiteRT with XNNPACK,
or onnxruntime), in interleaved blocks so that a busy machine biases no
width, and fits

    latency(plan) ≈ c + Σ_kind w_kind · MACs_kind(plan)

by non-negative least squares, where `kind` is the layer kind of each MAC
term (`Conv2D 1x1`, `Conv2D kxk`, `DepthwiseConv2D`, `Dense`, …) and
`MACs_kind(plan)` is exact (`CostModel`), or, with `tile=t > 1`, counted with
every pruned output-channel count rounded up to a multiple of `t` (capped at
the layer's full width): XNNPACK computes output channels in tiles (16 on the
AMD EPYC of BENCHMARKS.md, "Channel alignment"), so 37 channels cost what 48
do. The fit is cached on disk, keyed by
the model's structure, the runtime and its version, and the thread count; a
second model with the same structure reuses it without timing anything.

`make_plan(model, target_latency_ms=..., latency_model=...)` (or
`target_latency_reduction=`) searches plans on this prediction, exactly as it
does on MACs. `LatencyModel.check(plans)` measures plans and reports the
prediction error.

Reference:
    Yang et al., "NetAdapt: Platform-Aware Neural Network Adaptation for
    Mobile Applications", ECCV 2018 (budgets in measured latency, look-up
    cost models); the per-kind linear fit is ours.
"""

import hashlib
import json
import os
import tempfile
import time

import numpy as np
from absl import logging

from tfkdp import checks
from tfkdp.pruning.runtimes import RUNTIMES, cache_root, runtime_version

__all__ = ["LatencyModel", "RUNTIMES", "default_cache_dir", "layer_kind"]

_VERSION = 2  # bump when the fit changes: old cache entries are then ignored


def default_cache_dir():
    """`$TFKDP_CACHE/latency`, else `~/.cache/tfkdp/latency`."""
    return os.path.join(cache_root(), "latency")


def layer_kind(layer):
    """The kind of a layer for the fit: its class, and `1x1`/`kxk` for convolutions."""
    name = type(layer).__name__
    size = getattr(layer, "kernel_size", None)
    if size is not None and name in ("Conv1D", "Conv2D", "Conv3D", "SeparableConv2D"):
        return f"{name} {'1x1' if all(int(k) == 1 for k in size) else 'kxk'}"
    return name


def _structure(model):
    """The graph without names: each call's class, config, shapes and input positions."""
    from tfkdp.pruning.analysis import analyze

    analysis = analyze(model)
    position = {}
    calls = []
    for i, flat in enumerate(analysis.nodes):
        for key in flat.outputs:
            position[key] = i
        config = flat.layer.get_config() if hasattr(flat.layer, "get_config") else {}
        config = {k: v for k, v in config.items() if k != "name"}
        calls.append([
            type(flat.layer).__name__, config,
            [position.get(k, f"input{analysis.input_keys.index(k)}" if k in analysis.input_keys
                          else "?") for k in flat.inputs],
            [list(analysis.shapes[k]) for k in flat.outputs],
        ])  # fmt: skip
    return calls


def _structure_key(model, runtime, threads, version, tile=1):
    structure = _structure(model)  # names differ between copies of one architecture: not in the key
    payload = json.dumps([structure, runtime, version, int(threads), int(tile), _VERSION], sort_keys=True,
                         default=str)  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class LatencyModel:
    """Predicted latency (ms, batch 1) of `model` stripped by any plan, on a runtime.

    Args:
        model: a built functional model (the student before pruning).
        runtime: `"litert"` (float32 TFLite on LiteRT/XNNPACK) or
            `"onnxruntime"`.
        threads: runtime threads (>= 1).
        groups: the model's `ChannelGroup`s (computed when omitted).
        widths: kept fractions of every prunable group measured uniformly
            (the full model is always measured too).
        random_plans: further calibration plans with a random kept fraction
            per group (seeded).
        repeat: timed calls per calibration model (split in interleaved blocks).
        seed: seed of the random plans and the visiting order.
        tile: output channels per kernel tile of the runtime (>= 1): the
            features count each pruned output-channel count rounded up to a
            multiple of `tile` (capped at the full width); 1 counts exact MACs;
            `"auto"` uses the alignment the runtime rewards on this CPU,
            `tfkdp.pruning.alignment.measure_alignment(runtime, threads)["round_to"]`
            (measured once, cached on disk). Budgets (`Budget.latency_model`)
            use `"auto"`.
        cache_dir: where fits are cached (`default_cache_dir()`); `None`
            uses the default, `False` disables the cache.

    Attributes:
        kinds: the layer kinds of the fit's features.
        coefficients: `{"intercept_ms": c, kind: ms per MAC}`.
        measurements: `[{"keep": {group: count}, "measured_ms", "predicted_ms"}]` of the fit.
        build_seconds: time spent measuring (0 when loaded from the cache).
        from_cache: whether the fit was loaded.

    Raises:
        ValueError: for an unknown runtime or bad arguments.

    Example:
        >>> lat = LatencyModel(model, runtime="litert", threads=1)  # doctest: +SKIP
        >>> plan = make_plan(model, target_latency_ms=0.5 * lat.base_ms, latency_model=lat)  # doctest: +SKIP
        >>> lat.predict(plan) <= 0.5 * lat.base_ms * 1.02  # doctest: +SKIP
        True
    """

    def __init__(self, model, runtime="litert", threads=1, groups=None, widths=(0.25, 0.5, 0.75),
                 random_plans=4, repeat=60, seed=0, cache_dir=None, tile=1):  # fmt: skip
        from tfkdp.pruning.cost import CostModel

        checks.check_choice("latency runtime", runtime, tuple(RUNTIMES))
        self.runtime = runtime
        self.threads = checks.check_int("threads", threads, 1)
        self.repeat = checks.check_int("repeat", repeat, 5)
        self.random_plans = checks.check_int("random_plans", random_plans, 0)
        self.widths = tuple(checks.check_fraction("width", w) for w in widths)
        self.seed = checks.check_int("seed", seed, 0)
        if isinstance(tile, str) and tile.strip().lower() == "auto":
            from tfkdp.pruning.alignment import measure_alignment

            tile = int(measure_alignment(runtime, self.threads)["round_to"])
        self.tile = checks.check_int("tile", tile, 1)
        self.model = model
        self.cost = CostModel(model, groups)
        self.kinds = sorted({layer_kind(layer) for layer in self.cost.term_layers})
        self._kind_index = np.array([self.kinds.index(layer_kind(layer))
                                     for layer in self.cost.term_layers], dtype=np.int64)  # fmt: skip
        self.from_cache = False
        self.build_seconds = 0.0
        self.version = runtime_version(runtime)
        key = _structure_key(model, runtime, self.threads, self.version, self.tile)
        if cache_dir is None:
            cache_dir = default_cache_dir()
        self._cache_path = (os.path.join(cache_dir, f"{key}.json") if cache_dir is not False
                            else None)  # fmt: skip
        cached = self._load()
        if cached is not None:
            self.coefficients = cached["coefficients"]
            self.measurements = cached["measurements"]
            self.from_cache = True
            logging.info("latency model: loaded %s (%s, %d thread(s))", self._cache_path, runtime,
                         self.threads)  # fmt: skip
        else:
            self._fit()

    # -- features and prediction -----------------------------------------------
    def _features(self, pruned):
        macs = self.cost.term_macs(pruned, out_tile=self.tile)
        by_kind = np.bincount(self._kind_index, weights=macs, minlength=len(self.kinds))
        return np.concatenate([[1.0], by_kind])

    def _pruned(self, keep):
        return self.cost._pruned(keep)

    def predict_pruned(self, pruned):
        """Predicted ms for a vector of pruned channels per group (`CostModel` order)."""
        w = np.array([self.coefficients["intercept_ms"]]
                     + [self.coefficients.get(k, 0.0) for k in self.kinds])  # fmt: skip
        return float(self._features(pruned) @ w)

    def predict(self, keep):
        """Predicted ms of the model stripped to `keep` (a `PruningPlan` or `{group: count}`)."""
        return self.predict_pruned(self._pruned(keep))

    @property
    def base_ms(self):
        """Predicted ms of the unpruned model."""
        return self.predict({})

    # -- measuring ------------------------------------------------------------------
    def _calibration_plans(self):
        prunable = [g for g in self.cost.groups if g.prunable]
        rng = np.random.default_rng(self.seed)
        plans = [{}]
        for w in self.widths:
            plans.append({g.id: max(1, int(round(g.size * w))) for g in prunable})
        for _ in range(self.random_plans):
            plans.append({g.id: max(1, int(round(g.size * rng.uniform(0.2, 1.0)))) for g in prunable})
        return plans

    def measure(self, keeps):
        """Measured p50 ms of the model stripped to each of `keeps` (interleaved blocks)."""
        from tfkdp.export import latency as latency_lib
        from tfkdp.export.converters import export_model
        from tfkdp.export.runners import open_runner
        from tfkdp.pruning.plan import PruningPlan
        from tfkdp.pruning.surgery import strip_channels

        fmt = RUNTIMES[self.runtime]
        shape = tuple(int(d) for d in self.model.input_shape[1:])
        x = np.random.default_rng(self.seed).uniform(size=(1, *shape)).astype(np.float32)
        calls = {}
        with tempfile.TemporaryDirectory(prefix="tfkdp-latency-") as tmp:
            for i, keep in enumerate(keeps):
                plan = PruningPlan({gid: list(range(k)) for gid, k in _counts(keep).items()
                                    if k < self._size(gid)})  # fmt: skip
                stripped = strip_channels(self.model, plan) if len(plan) else self.model
                paths = export_model(stripped, os.path.join(tmp, str(i)), formats=(fmt,))
                runner = open_runner(fmt, paths[fmt], num_threads=self.threads)
                calls[i] = (runner.run, runner.prepare(x))
            rounds = min(10, self.repeat)
            times = latency_lib._interleaved_times(calls, 5, self.repeat, rounds, self.seed)
            calls.clear()
        return [float(np.percentile(times[i], 50)) for i in range(len(keeps))]

    def _size(self, gid):
        return int(self.cost.sizes[self.cost.index[gid]])

    def _fit(self):
        from scipy.optimize import nnls

        start = time.time()
        keeps = self._calibration_plans()
        measured = self.measure(keeps)
        features = np.array([self._features(self._pruned(k)) for k in keeps])
        scale = np.maximum(np.abs(features).max(axis=0), 1e-12)
        weights, _ = nnls(features / scale, np.asarray(measured))
        weights = weights / scale
        self.coefficients = {"intercept_ms": float(weights[0]),
                             **{k: float(w) for k, w in zip(self.kinds, weights[1:], strict=True)}}  # fmt: skip
        self.measurements = [
            {"keep": {k: int(v) for k, v in _counts(keep).items()}, "measured_ms": m,
             "predicted_ms": self.predict(keep)}
            for keep, m in zip(keeps, measured, strict=True)
        ]  # fmt: skip
        self.build_seconds = time.time() - start
        logging.info("latency model: %d calibration models timed on %s (%d thread(s)) in %.1f s",
                     len(keeps), self.runtime, self.threads, self.build_seconds)  # fmt: skip
        self._save()

    def check(self, keeps):
        """Measures `keeps` and compares with the prediction.

        Returns:
            `{"rows": [{"measured_ms", "predicted_ms", "error"}], "mean_abs_error",
            "max_abs_error"}` (relative errors).
        """
        return self.compare(keeps, self.measure(keeps))

    def compare(self, keeps, measured):
        """`check` on timings already measured: `measured[i]` is the p50 ms of `keeps[i]`."""
        rows = []
        for keep, m in zip(keeps, measured, strict=True):
            p = self.predict(keep)
            rows.append({"measured_ms": m, "predicted_ms": p, "error": (p - m) / m})
        errors = [abs(r["error"]) for r in rows]
        return {"rows": rows, "mean_abs_error": float(np.mean(errors)),
                "max_abs_error": float(np.max(errors))}  # fmt: skip

    # -- cache ------------------------------------------------------------------------
    def _load(self):
        if self._cache_path is None or not os.path.exists(self._cache_path):
            return None
        try:
            with open(self._cache_path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            return None
        if cached.get("kinds") != self.kinds:
            return None
        return cached

    def _save(self):
        if self._cache_path is None:
            return
        os.makedirs(os.path.dirname(self._cache_path), exist_ok=True)
        payload = {
            "runtime": self.runtime, "version": self.version, "threads": self.threads,
            "kinds": self.kinds, "tile": self.tile, "coefficients": self.coefficients,
            "measurements": self.measurements, "build_seconds": self.build_seconds,
        }  # fmt: skip
        from tfkdp.export._atomic import write_json_atomic

        write_json_atomic(self._cache_path, payload)

    def to_dict(self):
        """The fit, for reports."""
        return {
            "runtime": self.runtime, "threads": self.threads, "version": self.version,
            "tile": self.tile, "coefficients": self.coefficients, "measurements": self.measurements,
            "from_cache": self.from_cache, "build_seconds": self.build_seconds,
        }  # fmt: skip


def _counts(keep):
    if keep is None:
        return {}
    items = keep.items() if hasattr(keep, "items") else keep
    return {gid: (len(v) if isinstance(v, (list, tuple, np.ndarray)) else int(v)) for gid, v in items}

"""`verify`: every exported artifact, run on its own runtime, against the Keras model."""

import copy
import math
import os

import numpy as np
from absl import logging

from tfkdp.export.converters import FORMATS, model_signature
from tfkdp.export.runners import RUNTIMES, open_runner

__all__ = ["DEFAULT_TOLERANCES", "VerificationError", "min_agreement_samples", "verify"]

# Per format, what must hold (None = not checked):
# - max_abs_diff_rel: max |artifact - keras| over all outputs, divided by the
#   output scale (max |keras output| on the verification data), must be <= this.
# - min_top1_agreement: share of samples where the artifact's argmax equals
#   Keras' argmax must be >= this.
DEFAULT_TOLERANCES = {
    # Float32 graphs differ from Keras only by kernel summation order
    # (oneDNN vs XNNPACK vs MLAS): ~1e-6 relative in practice, 1e-4 leaves
    # room for deep models without hiding a wrong layer (those are O(1)).
    "saved_model": {"max_abs_diff_rel": 1e-4, "min_top1_agreement": None},
    "tflite": {"max_abs_diff_rel": 1e-4, "min_top1_agreement": None},
    "onnx": {"max_abs_diff_rel": 1e-4, "min_top1_agreement": None},
    # Sparse storage is lossless: the densified float32 weights are the same
    # numbers, so the float32 bound applies.
    "tflite_sparse": {"max_abs_diff_rel": 1e-4, "min_top1_agreement": None},
    # float16 weights carry 11 significant bits (relative rounding 2**-11 ≈
    # 5e-4 per weight); errors add up over layers, 1e-2 of the output scale.
    "tflite_f16": {"max_abs_diff_rel": 1e-2, "min_top1_agreement": None},
    # Dynamic range quantisation rounds weights to int8 and the hybrid kernels
    # quantise every activation batch to int8 at run time, so its logit error
    # is of the order of full int8 and model-dependent (a few % of the output
    # scale). A max-diff bound loose enough for every model would catch
    # nothing; the decision a classifier's user sees is the argmax, so it gets
    # the int8 rule.
    "tflite_dynamic": {"max_abs_diff_rel": None, "min_top1_agreement": 0.98},
    "tflite_int8": {"max_abs_diff_rel": None, "min_top1_agreement": 0.98},
}
_TOLERANCE_KEYS = ("max_abs_diff_rel", "min_top1_agreement")


def min_agreement_samples(min_top1_agreement):
    """Fewest samples on which one disagreement uses at most half of a top-1 bar's margin.

    On n samples one disagreement moves the agreement by 1/n. Below
    `1 / (1 - bar)` samples (50 for the 98 % bar) a single flipped near-tie
    fails the bar on its own; at `2 / (1 - bar)` (100 for 98 %) one
    disagreement costs 1 % and it takes three to fail. The pipeline's and
    `tfkdp-export`'s default of 1000 test images is well above.

    Args:
        min_top1_agreement: the bar, in [0, 1).

    Returns:
        The sample count (an int), or None for a bar of 1 or more, which no
        count makes robust to one disagreement.

    Example:
        >>> min_agreement_samples(0.98)
        100
    """
    margin = 1.0 - float(min_top1_agreement)
    if margin <= 0.0:
        return None
    # round(): 2 / (1 - 0.98) is 99.99999999999991 in floating point.
    return max(1, math.ceil(round(2.0 / margin, 6)))


class VerificationError(ValueError):
    """An artifact does not match the Keras model within its tolerance.

    Attributes:
        results: the full per-artifact results (as `verify` returns them),
            including the ones that passed.
        failures: one line per failed check, naming artifact, measured value
            and allowed value.
    """

    def __init__(self, failures, results):
        super().__init__(
            "exported artifact(s) do not match the Keras model:\n  " + "\n  ".join(failures)
        )
        self.failures = list(failures)
        self.results = results


def _merge_tolerances(tolerances):
    merged = copy.deepcopy(DEFAULT_TOLERANCES)
    for fmt, override in (tolerances or {}).items():
        if fmt not in merged:
            raise ValueError(
                f"tolerances has unknown format {fmt!r}; valid formats are {', '.join(FORMATS)}"
            )
        if not isinstance(override, dict) or set(override) - set(_TOLERANCE_KEYS):
            raise ValueError(
                f"tolerances[{fmt!r}] must be a dict with keys from {_TOLERANCE_KEYS}; "
                f"received {override!r}"
            )
        merged[fmt].update(override)
    return merged


def _check_inputs(model, x, y):
    signature = model_signature(model)
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"x must be preprocessed float model inputs (e.g. tfkdp.data.preprocess(images)); "
            f"received dtype {x.dtype}"
        )
    expected = signature.shape[1:]
    if x.ndim != len(expected) + 1 or any(
        d is not None and d != s for d, s in zip(expected, x.shape[1:], strict=True)
    ):
        raise ValueError(f"x has shape {x.shape}; the model input is {signature.shape}")
    if len(x) == 0:
        raise ValueError("x is empty; verification needs at least one sample")
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
            raise ValueError(
                f"y must be integer class labels, one per sample of x ({len(x)}); "
                f"received shape {y.shape} dtype {y.dtype}"
            )
    return x.astype(np.float32, copy=False), y


def _warn_few_samples(artifacts, limits, n, is_scores):
    """Logs when a top-1 bar is checked on so few samples that one disagreement weighs too much."""
    if not is_scores:
        return
    for fmt in artifacts:
        bar = limits[fmt]["min_top1_agreement"]
        needed = None if bar is None else min_agreement_samples(bar)
        if needed is not None and n < needed:
            logging.warning(
                "%s: top-1 agreement >= %g checked on only %d samples: one disagreement moves it "
                "by %.1f%%; use >= %d samples (e.g. more test images or --verify_samples)",
                fmt, bar, n, 100.0 / n, needed,
            )


def _batched(function, x, batch_size):
    return np.concatenate(
        [function(x[i : i + batch_size]) for i in range(0, len(x), batch_size)], axis=0
    )


def verify(model, artifacts, x, y=None, tolerances=None, batch_size=64, bake_scaling=None):
    """Runs each artifact on its runtime and compares it with the Keras model.

    Runtimes: `saved_model` on TensorFlow (its `serving_default` signature),
    `tflite*` on LiteRT (`ai_edge_litert`, XNNPACK), `onnx` on onnxruntime
    (CPUExecutionProvider). Int8 inputs/outputs are quantised/dequantised
    with the tensors' scale and zero point, so every comparison is in float.

    The output scale is max |Keras output| over `x` (1.0 if that is 0);
    max-abs-diff tolerances are relative to it. Defaults
    (`DEFAULT_TOLERANCES`): float32 formats (`tflite_sparse` included) 1e-4 of the output scale,
    `tflite_f16` 1e-2, `tflite_dynamic` and `tflite_int8` top-1 agreement with
    Keras >= 98 % (use real, structured data: on noise the logits are nearly
    tied and agreement says nothing).

    Args:
        model: the Keras model the artifacts were exported from.
        artifacts: `{format: path}`, e.g. the result of `export_model`.
        x: float inputs `(N, *input_shape)`, preprocessed as for the model.
        y: optional integer labels `(N,)`; adds each artifact's accuracy.
        tolerances: optional overrides, `{format: {"max_abs_diff_rel": float
            or None, "min_top1_agreement": float or None}}`; `None` disables
            a check.
        batch_size: artifacts run on batches of this size (the last batch may
            be smaller), which also exercises their dynamic batch dimension.
        bake_scaling: the input scaling baked into the artifacts
            (`export_model(..., bake_scaling=...)`): `x` is then raw 0–255
            pixels (float), fed as they are to the artifacts, and the Keras
            model gets `tfkdp.scaling.get(bake_scaling)(x)`.

    Returns:
        `{format: result}` with, per artifact: `path`, `runtime`, `n`,
        `max_abs_diff`, `output_scale`, `max_abs_diff_rel`, `top1_agreement`
        (None for outputs that are not `(N, classes)`), `accuracy` and
        `keras_accuracy` (when `y` is given), `checks` (list of
        `{metric, measured, allowed, passed}`), `passed` (always True on
        return) and `failures` (one line per failed check; empty here).
        A top-1 bar checked on fewer than `min_agreement_samples(bar)`
        samples (100 for 98 %) is logged as a warning.

    Raises:
        VerificationError: (a `ValueError`) if any artifact fails a check or
            does not load or run on its runtime (every artifact is still
            checked); the message names each artifact, the measured and the
            allowed value; `error.results` holds every result, failed ones
            with `passed: False`, their `failures` lines and, for one that
            did not run, `error`.
        ValueError: for bad `x`, `y`, `artifacts`, `tolerances`,
            `batch_size` or `bake_scaling`, or a top-1 check on outputs that
            are not class scores.
        FileNotFoundError: if an artifact path does not exist.

    Example:
        >>> from tfkdp.export import export_model
        >>> paths = export_model(model, tmp + "/out", formats=("tflite",))
        >>> results = verify(model, paths, x, y)
        >>> bool(results["tflite"]["max_abs_diff"] < 1e-4)
        True
    """
    if not isinstance(artifacts, dict) or not artifacts:
        raise ValueError(f"artifacts must be a non-empty {{format: path}} dict; received {artifacts!r}")
    unknown = [f for f in artifacts if f not in RUNTIMES]
    if unknown:
        raise ValueError(f"unknown artifact format(s) {unknown}; valid formats are {', '.join(FORMATS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; received batch_size={batch_size!r}")
    limits = _merge_tolerances(tolerances)
    x, y = _check_inputs(model, x, y)
    if bake_scaling is None:
        keras_inputs = x
    else:
        from tfkdp import scaling

        keras_inputs = np.asarray(scaling.get(bake_scaling)(x), np.float32)

    reference = _batched(lambda b: np.asarray(model(b, training=False)), keras_inputs, 256)
    reference = reference.astype(np.float64)
    scale = float(np.max(np.abs(reference))) or 1.0
    is_scores = reference.ndim == 2 and reference.shape[1] >= 2
    keras_top1 = np.argmax(reference, axis=-1) if is_scores else None

    _warn_few_samples(artifacts, limits, len(x), is_scores)

    results, failures = {}, []
    for fmt, path in artifacts.items():
        try:
            runner = open_runner(fmt, os.fspath(path))
            output = _batched(runner, x, batch_size).astype(np.float64)
        except (RuntimeError, ValueError) as error:
            # The artifact does not load or run on its runtime: a failed check
            # like any other, so the other artifacts are still verified.
            message = f"does not run: {type(error).__name__}: {' '.join(str(error).split())}"
        else:
            message = None
            if output.shape != reference.shape:
                message = f"output shape {output.shape} differs from Keras' {reference.shape}"
        if message is not None:
            line = f"{fmt} ({path}, {RUNTIMES[fmt]}): {message}"
            results[fmt] = {"path": os.fspath(path), "runtime": RUNTIMES[fmt], "n": int(len(x)),
                            "error": message, "checks": [], "passed": False, "failures": [line]}
            failures.append(line)
            continue
        max_abs_diff = float(np.max(np.abs(output - reference)))
        result = {
            "path": os.fspath(path),
            "runtime": runner.runtime,
            "n": int(len(x)),
            "max_abs_diff": max_abs_diff,
            "output_scale": scale,
            "max_abs_diff_rel": max_abs_diff / scale,
            "top1_agreement": (
                float(np.mean(np.argmax(output, axis=-1) == keras_top1)) if is_scores else None
            ),
        }
        if y is not None and is_scores:
            result["accuracy"] = float(np.mean(np.argmax(output, axis=-1) == y))
            result["keras_accuracy"] = float(np.mean(keras_top1 == y))
        checks = []
        limit = limits[fmt]["max_abs_diff_rel"]
        if limit is not None:
            # `not <=` also fails NaN outputs.
            passed = bool(max_abs_diff <= limit * scale)
            checks.append(
                {"metric": "max_abs_diff", "measured": max_abs_diff, "allowed": limit * scale,
                 "passed": passed}
            )
        limit = limits[fmt]["min_top1_agreement"]
        if limit is not None:
            if not is_scores:
                raise ValueError(
                    f"{fmt}: a top-1 agreement check needs (N, classes) outputs; the model "
                    f"outputs shape {reference.shape}. Pass tolerances={{{fmt!r}: "
                    "{'min_top1_agreement': None, 'max_abs_diff_rel': ...}}"
                )
            passed = bool(result["top1_agreement"] >= limit)
            checks.append(
                {"metric": "top1_agreement", "measured": result["top1_agreement"],
                 "allowed": limit, "passed": passed}
            )
        result["checks"] = checks
        result["passed"] = all(c["passed"] for c in checks)
        result["failures"] = []
        results[fmt] = result
        for c in checks:
            if not c["passed"]:
                bound = "<=" if c["metric"] == "max_abs_diff" else ">="
                line = (
                    f"{fmt} ({path}, {runner.runtime}): {c['metric']} = {c['measured']:.6g}, "
                    f"allowed {bound} {c['allowed']:.6g} (output scale {scale:.6g}, n={len(x)})"
                )
                needed = min_agreement_samples(c["allowed"]) if c["metric"] == "top1_agreement" else None
                if needed is not None and len(x) < needed:
                    line += (
                        f"; one disagreement is {1 / len(x):.1%} of n={len(x)}: verify on "
                        f">= {needed} images before trusting this"
                    )
                result["failures"].append(line)
                failures.append(line)
        logging.info(
            "verified %s on %s: max|diff| %.3g (%.2g of scale), top-1 agreement %s",
            fmt, runner.runtime, max_abs_diff, max_abs_diff / scale, result["top1_agreement"],
        )
    if failures:
        raise VerificationError(failures, results)
    return results

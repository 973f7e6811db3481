"""`python -m tfkdp.export` / `tfkdp-export`: export a `.keras` model, verify every artifact, time it.

    python -m tfkdp.export --model=student.keras --out=deploy \\
        --formats=tflite,tflite_int8,onnx --calibration=fashion_mnist --latency --threads=1,2

Steps: load the model; load `--calibration` data (`fashion_mnist`, or
`npz:PATH` with `x_train, y_train, x_test, y_test`), scaled by `--input_scaling` through
`tfkdp.data.preprocess` (default [0, 1], the scaling `tfkdp.data.make_dataset` trains with;
with `--bake_preprocessing` the scaling goes into the artifacts and they get raw pixels);
export (int8 calibration on `--calibration_samples` training images); verify
every artifact against Keras on the first `--verify_samples` test images
(random [0, 1) inputs when no `--calibration` is given, which only the float
formats accept); optionally time each artifact on its runtime; print a table
and write `export_report.json` into `--out` atomically.

Exit status: 0 success; 1 a converter or a verification check failed (the
report is still written when artifacts exist); 2 bad input (missing or
corrupt model, calibration data of the wrong shape or dtype, unwritable
`--out`, dynamic input dims where a format needs them fixed). Bad flag values
are rejected by absl at parse time.
"""

import os
import re
import sys
import time

from absl import app, flags

_CALIBRATION = re.compile(r"^(fashion_mnist|npz:.+)$")
# Formats whose check is top-1 agreement, meaningful only on real data.
_NEEDS_REAL_DATA = ("tflite_dynamic", "tflite_int8")


def define_flags(flag_values=flags.FLAGS):
    """Defines the CLI flags on `flag_values` (the global FLAGS for the CLI)."""
    from tfkdp.export.converters import FORMATS

    kw = {"flag_values": flag_values}
    flags.DEFINE_string("model", None, "Path of the Keras model (.keras or .h5).", **kw)
    flags.DEFINE_string("out", None, "Output folder; created if missing.", **kw)
    flags.DEFINE_list(
        "formats", [f for f in FORMATS if f not in _NEEDS_REAL_DATA],
        f"Comma-separated formats from {','.join(FORMATS)}. The default is every format that "
        f"needs no data; {' and '.join(_NEEDS_REAL_DATA)} need --calibration.", **kw,
    )  # fmt: skip
    flags.DEFINE_string(
        "calibration", None,
        "Data for int8 calibration and verification: 'fashion_mnist' or 'npz:PATH'.", **kw,
    )  # fmt: skip
    flags.DEFINE_integer(
        "calibration_samples", 500, "Training images used for int8 calibration.", lower_bound=1, **kw
    )
    flags.DEFINE_integer(
        "verify_samples", 1000, "Test images each artifact is verified on.", lower_bound=1, **kw
    )
    flags.DEFINE_integer("opset", 17, "ONNX opset.", **kw)
    flags.DEFINE_bool("int8_io", False, "tflite_int8 takes and returns int8 tensors.", **kw)
    flags.DEFINE_string(
        "input_scaling", "unit",
        "How --calibration's 0-255 pixels become model inputs (tfkdp.scaling): unit, raw, "
        "symmetric, caffe or torch.", **kw,
    )  # fmt: skip
    flags.DEFINE_bool(
        "bake_preprocessing", False,
        "Put --input_scaling into the artifacts: they take raw 0-255 images (tflite_int8: uint8).",
        **kw,
    )  # fmt: skip
    flags.DEFINE_bool(
        "keep_going", False, "If a converter fails, export the other formats (exit 1).", **kw
    )
    flags.DEFINE_bool("latency", False, "Time every artifact on its runtime.", **kw)
    flags.DEFINE_list("threads", ["1"], "Thread counts for --latency, e.g. 1,2.", **kw)
    flags.DEFINE_integer("batch_size", 1, "Batch size for --latency.", lower_bound=1, **kw)
    flags.DEFINE_integer("latency_warmup", 20, "Untimed calls per measurement.", lower_bound=0, **kw)
    flags.DEFINE_integer("latency_repeat", 200, "Timed calls per measurement.", lower_bound=1, **kw)
    flags.mark_flags_as_required(["model", "out"], flag_values=flag_values)

    flags.register_validator(
        "formats",
        lambda names: bool(names) and all(n in FORMATS for n in names),
        message=f"--formats takes names from {','.join(FORMATS)}",
        flag_values=flag_values,
    )
    flags.register_validator(
        "threads",
        lambda values: bool(values) and all(v.isdigit() and int(v) >= 1 for v in values),
        message="--threads takes positive integers, e.g. --threads=1,2",
        flag_values=flag_values,
    )
    flags.register_validator(
        "calibration",
        lambda value: value is None or bool(_CALIBRATION.match(value)),
        message="--calibration takes 'fashion_mnist' or 'npz:PATH'",
        flag_values=flag_values,
    )
    flags.register_multi_flags_validator(
        ["formats", "calibration"],
        lambda d: d["calibration"] is not None
        or not any(f in _NEEDS_REAL_DATA for f in d["formats"]),
        message=f"--formats with {' or '.join(_NEEDS_REAL_DATA)} needs --calibration (real data "
        "for int8 calibration and the top-1 agreement check)",
        flag_values=flag_values,
    )


def load_model(path):
    """Loads a `.keras`/`.h5` model; clear errors for a missing or unreadable file."""
    import keras

    import tfkdp  # noqa: F401 - registers tfkdp's serialisable layers before loading

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: --model={path!r}")
    if not path.endswith((".keras", ".h5")):
        raise ValueError(f"--model must be a .keras or .h5 file; received {path!r}")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - zip, h5, JSON and config errors all mean "unreadable"
        raise ValueError(
            f"could not load Keras model {path!r} (corrupt or not a Keras model?): "
            f"{type(error).__name__}: {error}"
        ) from error


def load_data(spec, input_shape, calibration_samples, verify_samples, seed=0,
              input_scaling="unit", raw=False):  # fmt: skip
    """Calibration images and verification (images, labels) for `--calibration`.

    Returns:
        `(calibration, x_verify, y_verify, description)`; float32 arrays
        scaled by `input_scaling` (`tfkdp.scaling`; `unit`: [0, 1]), or raw
        0-255 pixels with `raw` (artifacts with a baked scaling). Without
        `spec`: no calibration, seeded noise for verification, no labels.

    Raises:
        ValueError: for an unknown `input_scaling` (listing the valid names).
    """
    import numpy as np

    from tfkdp import data

    if spec is None:
        if any(d is None for d in input_shape):
            raise ValueError(
                f"the model input {input_shape} has dynamic dimensions; pass --calibration so "
                "verification runs on real images of a definite shape"
            )
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 1, size=(verify_samples, *input_shape)).astype(np.float32)
        x = data.to_pixels(x) if raw else data.preprocess(x, scaling=input_scaling).numpy()
        return None, x, None, f"{verify_samples} uniform [0, 1) random inputs (no --calibration)"
    if spec == "fashion_mnist":
        (x_train, _), (x_test, y_test) = data.load_fashion_mnist()
        source = "Fashion-MNIST"
    else:
        path = spec[len("npz:") :]
        (x_train, _), (x_test, y_test) = data.from_npz(path)
        source = f"npz {path}"
    order = np.random.default_rng(seed).permutation(len(x_train))[:calibration_samples]
    if raw:
        calibration, x = data.to_pixels(x_train[order]), data.to_pixels(x_test[:verify_samples])
    else:
        calibration = np.asarray(data.preprocess(x_train[order], scaling=input_scaling))
        x = np.asarray(data.preprocess(x_test[:verify_samples], scaling=input_scaling))
    y = np.asarray(y_test[:verify_samples]).astype(np.int64)
    description = (
        f"{source}: {len(calibration)} random training images for calibration, "
        f"the first {len(x)} test images for verification"
    )
    return calibration, x, y, description


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(report):
    """The report as a plain-text table: one row per artifact."""
    threads = sorted({row["threads"] for row in report.get("latency", [])})
    header = ["format", "runtime", "size KiB", "max|diff|", "rel", "top-1 agree", "accuracy", "ok"]
    header += [f"p50 ms t={t}" for t in threads]
    rows = []
    for fmt, artifact in report["artifacts"].items():
        check = report.get("verification", {}).get(fmt, {})
        latency = {
            r["threads"]: r["p50_ms"] for r in report.get("latency", []) if r["format"] == fmt
        }
        rows.append(
            [
                fmt,
                check.get("runtime", "-"),
                f"{artifact['size_bytes'] / 1024:.1f}",
                _fmt(check.get("max_abs_diff"), ".2e"),
                _fmt(check.get("max_abs_diff_rel"), ".1e"),
                _fmt(check.get("top1_agreement"), ".4f"),
                _fmt(check.get("accuracy"), ".4f"),
                {True: "yes", False: "NO"}.get(check.get("passed"), "-"),
            ]
            + [_fmt(latency.get(t), ".3f") for t in threads]
        )
    for fmt, message in report.get("failures", {}).items():
        rows.append([fmt, "-", "-", "-", "-", "-", "-", "FAILED"] + ["-"] * len(threads))
        rows.append([f"  {message.splitlines()[0][:100]}"] + [""] * (len(header) - 1))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def main(argv, flag_values=flags.FLAGS):
    """Runs the export with parsed `flag_values`; returns the exit status."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    # Submodules, not the package namespace: works even where an old editable
    # install maps `export` as a namespace package.
    from tfkdp.export._atomic import tree_size_bytes, write_json_atomic
    from tfkdp.export.converters import ExportError, export_model, model_signature
    from tfkdp.export.latency import benchmark_latency, runtime_versions
    from tfkdp.export.verify import VerificationError, verify

    fv = flag_values
    started = time.time()
    try:
        model = load_model(fv.model)
        signature = model_signature(model)
        bake = fv.input_scaling if fv.bake_preprocessing else None
        calibration, x, y, data_description = load_data(
            fv.calibration, signature.shape[1:], fv.calibration_samples, fv.verify_samples,
            input_scaling=fv.input_scaling, raw=bake is not None,
        )  # fmt: skip
        artifacts = export_model(
            model, fv.out, formats=fv.formats, calibration=calibration, opset=fv.opset,
            keep_going=fv.keep_going, int8_io=fv.int8_io, bake_scaling=bake,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, ImportError) as error:
        sys.stderr.write(f"tfkdp-export: error: {error}\n")
        return 2
    except ExportError as error:
        sys.stderr.write(f"tfkdp-export: error: {error}\n")
        return 1

    status = 1 if artifacts.failures else 0
    report = {
        "model": os.path.abspath(fv.model),
        "model_name": model.name,
        "input_name": signature.name,
        "input_shape": list(signature.shape),
        "formats": list(fv.formats),
        "artifacts": {
            f: {"path": p, "size_bytes": tree_size_bytes(p)} for f, p in artifacts.items()
        },
        "failures": dict(artifacts.failures),
        "verification_data": data_description,
    }
    try:
        report["verification"] = verify(model, dict(artifacts), x, y, bake_scaling=bake)
        report["verified"] = True
    except VerificationError as error:
        sys.stderr.write(f"tfkdp-export: error: {error}\n")
        report["verification"] = error.results
        report["verified"] = False
        status = 1
    if fv.latency and report["verified"]:
        report["latency"] = benchmark_latency(
            dict(artifacts), tuple(x.shape[1:]), threads=tuple(int(t) for t in fv.threads),
            batch_size=fv.batch_size, warmup=fv.latency_warmup, repeat=fv.latency_repeat,
            input_scaling=fv.input_scaling, bake_scaling=bake,
        )
    report["versions"] = runtime_versions()
    report["flags"] = {name: fv[name].value for name in _OWN_FLAGS}
    report["wall_s"] = round(time.time() - started, 2)
    report_path = os.path.join(os.path.abspath(fv.out), "export_report.json")
    write_json_atomic(report_path, report)
    print(format_table(report))
    print(f"\nreport: {report_path}")
    return status


_OWN_FLAGS = (
    "model", "out", "formats", "calibration", "calibration_samples", "verify_samples", "opset",
    "int8_io", "keep_going", "latency", "threads", "batch_size", "latency_warmup",
    "latency_repeat", "input_scaling", "bake_preprocessing",
)  # fmt: skip


def run():
    """Console-script entry point (`tfkdp-export`).

    oneDNN's custom operations are turned off first (TensorFlow reads the
    switch once, when imported), unless `TFKDP_ONEDNN=1` or
    `TF_ENABLE_ONEDNN_OPTS` is set: see `tfkdp.onednn`.
    """
    from tfkdp.onednn import disable_for_entry_point

    disable_for_entry_point()
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()

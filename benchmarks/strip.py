"""Strip benchmark: does removing channels make LiteRT faster in proportion to MACs?

For resnet20, resnet56 and mobilenet_v2_cifar (32×32×3 inputs, CIFAR
figures, random initial weights: latency does not depend on weight values),
at 30/50/70 % MAC reduction with `tfkdp.make_plan`'s L1 plan (uniform
allocation: every prunable group keeps the same fraction of its channels;
global where uniform cannot land within 2 % of the target), with and without
rounding channel counts to multiples of `round_to`:

- MACs and parameters of the original and the stripped model
  (`tfkdp.surgery.strip_channels`; the masked model is checked to compute the
  same outputs);
- TFLite latency on LiteRT (`ai_edge_litert.interpreter.Interpreter`,
  XNNPACK default delegate, `num_threads=1`, batch 1, float32), converted
  with `tf.lite.TFLiteConverter.from_keras_model` after `fold_batchnorm`.
  The original and the stripped interpreter are timed interleaved, in
  alternating blocks, so that load from other processes hits both alike;
  the median of all runs of each is reported;
- latency speedup ÷ MAC speedup (1.0 = the runtime turns every saved MAC
  into saved time).

Run (from the repository root, once, with nothing else benchmarking):

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.strip

Writes benchmarks/results/strip.json and benchmarks/results/strip.md.
"""

import argparse
import contextlib
import io
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import metrics, models, onednn  # noqa: E402
from tfkdp.pruning import (  # noqa: E402
    apply_plan,  # noqa: E402
    fold_batchnorm,
    make_plan,
    plan_macs,
    strip_channels,
)

INPUT_SHAPE = (32, 32, 3)
KERNEL_ATTRS = ("kernel", "depthwise_kernel", "pointwise_kernel")


def plan_for(model, target, round_to):
    """`make_plan`'s uniform L1 plan for `target` (global allocation where uniform cannot
    land within 2 %); `(plan, reduction, allocation)`, or `(None, error, None)` when the
    target cannot be reached at this `round_to`."""
    base = metrics.count_macs(model)
    error = None
    for allocation in ("uniform", "global"):
        try:
            plan = make_plan(model, target_macs_reduction=target, criterion="l1",
                             allocation=allocation, round_to=round_to)  # fmt: skip
        except ValueError as exc:
            error = str(exc)
            continue
        return plan, 1.0 - plan_macs(model, plan) / base, allocation
    return None, error, None


def to_tflite(model):
    import tensorflow as tf

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        converter = tf.lite.TFLiteConverter.from_keras_model(fold_batchnorm(model))
        return converter.convert()


def interpreter(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=flatbuffer, num_threads=1)
    it.allocate_tensors()
    detail = it.get_input_details()[0]
    x = np.random.default_rng(0).random(detail["shape"]).astype(detail["dtype"])
    it.set_tensor(detail["index"], x)
    return it


def time_interleaved(interpreters, runs, block, warmup):
    """Median seconds per invoke of each interpreter, timed in alternating blocks."""
    for it in interpreters:
        for _ in range(warmup):
            it.invoke()
    samples = [[] for _ in interpreters]
    rounds = -(-runs // block)
    for r in range(rounds):
        order = range(len(interpreters)) if r % 2 == 0 else reversed(range(len(interpreters)))
        for i in order:
            it = interpreters[i]
            for _ in range(block):
                start = time.perf_counter()
                it.invoke()
                samples[i].append(time.perf_counter() - start)
    return [float(np.median(s)) for s in samples], [len(s) for s in samples]


def build(name):
    kwargs = {"input_shape": INPUT_SHAPE, "num_classes": 10}
    return models.get(name, **kwargs)


def main(argv=None):
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet20", "resnet56", "mobilenet_v2_cifar"]
    )
    parser.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--round_to", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--runs", type=int, default=400, help="timed invokes per model (>= 200)")
    parser.add_argument("--block", type=int, default=20, help="invokes per interleaved block")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "strip"))
    args = parser.parse_args(argv)
    if args.runs < 200:
        parser.error(f"--runs must be >= 200; received {args.runs}")

    import tensorflow as tf
    from ai_edge_litert import __version__ as litert_version

    keras.utils.set_random_seed(0)
    started = time.time()
    rows = []
    for name in args.models:
        model = build(name)
        base_macs, base_params = metrics.count_macs(model), metrics.count_params(model)
        base_tflite = to_tflite(model)
        x = np.random.default_rng(1).normal(size=(2, *INPUT_SHAPE)).astype("float32")
        for target in args.targets:
            for round_to in args.round_to:
                plan, reduction, allocation = plan_for(model, target, round_to)
                if plan is None:
                    rows.append({"model": name, "target": target, "round_to": round_to,
                                 "allocation": "unreachable", "note": reduction})  # fmt: skip
                    print(f"{name:20s} target {target:.0%} round_to {round_to}: {reduction}", flush=True)
                    continue
                t0 = time.perf_counter()
                stripped = strip_channels(model, plan)
                strip_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                predicted = plan_macs(model, plan)
                plan_macs_seconds = time.perf_counter() - t0
                masked_out = apply_plan(model, plan)(x).numpy()
                stripped_out = stripped(x).numpy()
                rel_diff = float(np.abs(masked_out - stripped_out).max() / np.abs(masked_out).max())
                macs, params = metrics.count_macs(stripped), metrics.count_params(stripped)
                if predicted != macs:
                    raise RuntimeError(f"plan_macs {predicted} != count_macs {macs} for {name}")
                (lat_orig, lat_strip), counts = time_interleaved(
                    [interpreter(base_tflite), interpreter(to_tflite(stripped))],
                    args.runs, args.block, args.warmup,
                )  # fmt: skip
                mac_speedup = base_macs / macs
                latency_speedup = lat_orig / lat_strip
                row = {
                    "model": name,
                    "target": target,
                    "round_to": round_to,
                    "allocation": allocation,
                    "mac_reduction": round(reduction, 4),
                    "macs": base_macs,
                    "macs_stripped": macs,
                    "params": base_params,
                    "params_stripped": params,
                    "latency_ms": round(lat_orig * 1e3, 4),
                    "latency_stripped_ms": round(lat_strip * 1e3, 4),
                    "latency_speedup": round(latency_speedup, 3),
                    "mac_speedup": round(mac_speedup, 3),
                    "speedup_ratio": round(latency_speedup / mac_speedup, 3),
                    "timed_runs": counts,
                    "strip_seconds": round(strip_seconds, 3),
                    "plan_macs_seconds": round(plan_macs_seconds, 4),
                    "masked_vs_stripped_max_rel_diff": rel_diff,
                }
                rows.append(row)
                print(
                    f"{name:20s} target {target:.0%} round_to {round_to}: MACs -{reduction:.1%} "
                    f"({base_macs / 1e6:.1f}M -> {macs / 1e6:.1f}M), latency {lat_orig * 1e3:.3f} -> "
                    f"{lat_strip * 1e3:.3f} ms, speedup {latency_speedup:.2f}x / MAC {mac_speedup:.2f}x "
                    f"= {latency_speedup / mac_speedup:.2f}",
                    flush=True,
                )
        keras.backend.clear_session()
    payload = {
        "benchmark": "strip",
        "command": "flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.strip "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "input_shape": list(INPUT_SHAPE),
        "weights": "random initialisation (latency does not depend on values)",
        "plan": "tfkdp.make_plan(criterion='l1', allocation='uniform', round_to=...) within 2 % "
        "of the target (allocation='global' where uniform cannot land; 'unreachable' rows: "
        "neither can at that round_to)",
        "runtime": f"ai_edge_litert {litert_version}, XNNPACK, num_threads=1, batch 1, float32",
        "converter": f"tf.lite.TFLiteConverter.from_keras_model (TF {tf.__version__}) after fold_batchnorm",
        "timing": f"median of {args.runs} invokes per model, {args.block}-invoke blocks interleaved",
        "cpu": common.cpu_name(),
        "cpu_count": os.cpu_count(),
        "wall_seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    common.write_json(args.out + ".json", payload)
    columns = [
        "model", "target", "round_to", "allocation", "mac_reduction", "macs", "macs_stripped", "params",
        "params_stripped", "latency_ms", "latency_stripped_ms", "latency_speedup", "mac_speedup",
        "speedup_ratio",
    ]  # fmt: skip
    text = (
        "# Strip benchmark\n\n"
        f"Command: `{payload['command'].strip()}`  \n"
        f"Runtime: {payload['runtime']}; {payload['timing']}.  \n"
        f"Converter: {payload['converter']}.  \n"
        f"Inputs {INPUT_SHAPE}, {payload['weights']}; plan: {payload['plan']}.  \n"
        f"CPU: {payload['cpu']} ({payload['cpu_count']} cores, shared with other jobs); "
        f"wall {payload['wall_seconds']} s.\n\n"
        + common.markdown_table(rows, columns)
        + "\n\n`speedup_ratio` = latency speedup ÷ MAC speedup (target >= 0.8 at 50 %).\n"
    )
    common.write_text(args.out + ".md", text)
    print(common.markdown_table(rows, columns))


if __name__ == "__main__":
    main()

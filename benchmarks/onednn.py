"""oneDNN benchmark: does the tiny pipeline survive, and what does oneDNN off cost?

Two measurements, each in fresh subprocesses (TensorFlow reads
TF_ENABLE_ONEDNN_OPTS once, at import):

1. **Reliability**: the tiny pipeline of issue 12 (`--dataset=npz:` 512
   training images of 16×16×1, `--teacher=resnet8 --method=kdp
   --target_macs_reduction=0.5 --teacher_epochs=2 --compress_epochs=2
   --finetune_epochs=1`) run `--runs` times with the entry point's defaults
   (oneDNN off unless TFKDP_ONEDNN=1), and, with `--with-onednn`, as many
   times with oneDNN forced on and only the library's `make_plan` guard
   between the model and the bug. Exit codes and signals are recorded.
2. **Cost**: median training-step time of resnet20 (28×28×1, batch 128) with
   oneDNN's custom operations on and off, alternating processes, as a ratio
   off / on measured in one run.

On a CPU without AVX-512 (AMD EPYC here) oneDNN's custom operations are off by
TensorFlow's default and the bug cannot occur; the numbers that matter come
from an AVX-512 Intel CPU. The CPU is recorded with the results.

Run (from the repository root, with nothing else benchmarking):

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.onednn --runs 5

Writes benchmarks/results/onednn.json and onednn.md.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common

_STEP_PROBE = """
import os, sys, time
import numpy as np
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
import keras
from tfkdp import models
from tfkdp.train import recipe
keras.utils.set_random_seed(0)
steps = int(sys.argv[1])
model = models.resnet_cifar(20, input_shape=(28, 28, 1), num_classes=10)
recipe.compile_classifier(model, recipe.make_optimizer(10**6, 0.05))
x = np.random.default_rng(0).random((128, 28, 28, 1), dtype=np.float32)
y = np.zeros(128, "int64")
model.train_on_batch(x, y)
times = []
for _ in range(steps):
    start = time.perf_counter()
    model.train_on_batch(x, y)
    times.append(time.perf_counter() - start)
print("RESULT", _pywrap_util_port.IsMklEnabled(), sorted(times)[len(times) // 2])
"""


def _tiny_npz(path, n_train=512, n_test=64, size=16, classes=4):
    rng = np.random.default_rng(0)

    def make(n):
        y = np.arange(n) % classes
        x = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
        for i, label in enumerate(y):
            x[i, :, label * (size // classes):(label + 1) * (size // classes)] += 150
        return x, y.astype(np.int64)

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def _pipeline_runs(runs, env_extra, folder):
    npz = _tiny_npz(os.path.join(folder, "tiny.npz"))
    results = []
    for i in range(runs):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env_extra)
        command = [
            sys.executable, "-m", "tfkdp.pipelines.compress", f"--dataset=npz:{npz}",
            "--teacher=resnet8", "--method=kdp", "--target_macs_reduction=0.5",
            "--teacher_epochs=2", "--compress_epochs=2", "--finetune_epochs=1",
            "--formats=tflite", "--verify_samples=32", "--latency_repeat=20",
            f"--output_dir={os.path.join(folder, f'run{i}')}",
        ]  # fmt: skip
        start = time.time()
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        tail = result.stderr.strip().splitlines()[-1:] if result.returncode else []
        results.append({"returncode": result.returncode, "seconds": round(time.time() - start, 1),
                        "last_stderr_line": tail[0] if tail else ""})  # fmt: skip
        print(f"  run {i}: exit {result.returncode} ({results[-1]['seconds']} s)", flush=True)
    return results


def _step_times(pairs, steps):
    """Median step time (s) per setting over `pairs` alternating on/off processes."""
    times = {"on": [], "off": []}
    enabled = {}
    for _ in range(pairs):
        for setting in ("on", "off"):
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                       TF_ENABLE_ONEDNN_OPTS="1" if setting == "on" else "0")  # fmt: skip
            out = subprocess.run([sys.executable, "-c", _STEP_PROBE, str(steps)], env=env,
                                 capture_output=True, text=True, timeout=1800)  # fmt: skip
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
            _, mkl, seconds = line.split()
            enabled[setting] = mkl == "True"
            times[setting].append(float(seconds))
            print(f"  oneDNN {setting} (active: {mkl}): {float(seconds) * 1e3:.1f} ms/step", flush=True)
    return {
        "on_ms": round(1e3 * statistics.median(times["on"]), 2),
        "off_ms": round(1e3 * statistics.median(times["off"]), 2),
        "off_over_on": round(statistics.median(times["off"]) / statistics.median(times["on"]), 3),
        "onednn_active_when_on": enabled.get("on"),
        "pairs": pairs,
        "steps": steps,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="tiny-pipeline runs per setting")
    parser.add_argument("--with-onednn", action="store_true",
                        help="also run the pipeline with oneDNN forced on (TFKDP_ONEDNN=1)")
    parser.add_argument("--pairs", type=int, default=3, help="on/off process pairs for the cost")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per process")
    parser.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "onednn"))
    args = parser.parse_args(argv)
    from tfkdp import onednn

    flags = onednn._cpu_flags()
    payload = {
        "benchmark": "onednn",
        "command": "flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.onednn "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": common.cpu_name(),
        "cpu_count": os.cpu_count(),
        "avx512f": "avx512f" in flags,
    }
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        print("tiny pipeline, entry-point defaults:", flush=True)
        payload["pipeline_default"] = _pipeline_runs(args.runs, {}, folder)
        if args.with_onednn:
            print("tiny pipeline, oneDNN forced on (make_plan's guard only):", flush=True)
            payload["pipeline_onednn_on"] = _pipeline_runs(
                args.runs, {"TFKDP_ONEDNN": "1", "TF_ENABLE_ONEDNN_OPTS": "1"}, folder
            )
    print("step time, resnet20 28x28x1 batch 128:", flush=True)
    payload["step_time"] = _step_times(args.pairs, args.steps)
    payload["wall_seconds"] = round(time.time() - started, 1)
    common.write_json(args.out + ".json", payload)
    rows = []
    for key in ("pipeline_default", "pipeline_onednn_on"):
        if key in payload:
            runs = payload[key]
            rows.append({"setting": key, "completed": f"{sum(r['returncode'] == 0 for r in runs)}/{len(runs)}",
                         "exit_codes": " ".join(str(r["returncode"]) for r in runs)})  # fmt: skip
    step = payload["step_time"]
    text = (
        "# oneDNN benchmark\n\n"
        f"Command: `{payload['command'].strip()}`  \n"
        f"CPU: {payload['cpu']} ({payload['cpu_count']} cores), AVX-512: {payload['avx512f']}; "
        f"wall {payload['wall_seconds']} s.\n\n"
        + common.markdown_table(rows, ["setting", "completed", "exit_codes"])
        + f"\n\nresnet20 training step (28×28×1, batch 128, median of {step['pairs']} process "
        f"pairs × {step['steps']} steps): oneDNN on {step['on_ms']} ms (active: "
        f"{step['onednn_active_when_on']}), off {step['off_ms']} ms, off/on = {step['off_over_on']}.\n"
    )
    common.write_text(args.out + ".md", text)
    print(text)


if __name__ == "__main__":
    main()

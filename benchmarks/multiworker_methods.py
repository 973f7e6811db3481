"""Every registered method under `--strategy=multiworker`: two local workers, tiny data.

For each method, two worker processes on 127.0.0.1 (one CPU device and one
thread each; `TF_CONFIG` per process) run the whole pipeline on the tests'
tiny npz data (96 images 12×12×1, 3 classes, global batch 16) with an
untrained resnet8 teacher file, 1 compress epoch and 1 fine-tune epoch
(recipes without a fine-tune phase skip it), `tflite` only. A row records
whether both workers exited 0, whether the chief wrote `report.json`, the
wall time, and the largest difference between the two workers' weights after
the compress and fine-tune stages (0 means bit-identical).

    .venv/bin/python -m benchmarks.multiworker_methods [--methods kdp ddsl ...]

Writes benchmarks/results/multiworker_methods.json.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import onednn  # noqa: E402
from tfkdp.train import runtime  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the tests' worker harness

RESULTS = os.path.join(common.RESULTS_DIR, "multiworker_methods.json")
# Per-method options, as in each recipe's own pipeline test.
OPTIONS = {
    "ddsl": {"dean_every": 2},
    "mskd": {"finetune_epochs": 0, "mskd_top_k": 2},
    "pdc": {"pdc_epsilon": 3.0},
    "cascade": {"cascade_stage2_epochs": 0},
}


def _teacher(folder):
    import keras

    from tfkdp import models

    keras.utils.set_random_seed(0)
    path = os.path.join(folder, "resnet8.keras")
    models.get("resnet8", input_shape=(12, 12, 1), num_classes=3).save(path)
    return path


def _max_diff(a, b):
    if a.keys() != b.keys():
        return float("inf")
    return max((float(np.max(np.abs(a[k] - b[k]))) for k in a), default=0.0)


def run_method(method, folder, teacher, timeout):
    import pathlib

    import test_multiworker as harness
    from test_pipeline import _values

    tmp = pathlib.Path(folder) / method
    tmp.mkdir(parents=True)
    options = {"compress_epochs": 1, "finetune_epochs": 1, **OPTIONS.get(method, {})}
    values = _values(tmp, teacher=teacher, strategy="multiworker", method=method,
                     formats=["tflite"], verify_samples=16, latency_repeat=2, **options)  # fmt: skip
    other = dict(values, output_dir=str(tmp / "worker1_out"))
    start = time.time()
    procs = harness._launch(tmp, [values, other], runtime.free_ports(2), attempt=1)
    row = {"method": method}
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, start + timeout - time.time()))
    except Exception:  # noqa: BLE001 - a timeout is a result here
        harness._kill(procs)
    row["seconds"] = round(time.time() - start, 1)
    row["exit_codes"] = [p.returncode for p in procs]
    row["report"] = os.path.exists(os.path.join(values["output_dir"], "report.json"))
    row["ok"] = row["exit_codes"] == [0, 0] and row["report"]
    for stage in ("compress", "finetune"):
        paths = [tmp / f"dump{i}" / f"{stage}.npz" for i in range(2)]
        if all(p.exists() for p in paths):
            row[f"{stage}_max_diff"] = _max_diff(*[harness._load(p) for p in paths])
    if not row["ok"]:
        log = (tmp / "worker0.1.log").read_text()
        row["error"] = [line for line in log.splitlines() if "Error" in line][-3:]
        row["log"] = str(tmp / "worker0.1.log")
    return row


def main():
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    from tfkdp import methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(methods.names()))
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    rows = []
    folder = tempfile.mkdtemp(prefix="tfkdp-mw-")  # kept when a method fails: its logs
    teacher = _teacher(folder)
    for method in args.methods:
        row = run_method(method, folder, teacher, args.timeout)
        rows.append(row)
        common.write_json(RESULTS, rows)
        print(json.dumps(row), flush=True)
    if all(r["ok"] for r in rows):
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{'method':<12} {'ok':<5} {'s':>6} {'compress Δ':>11} {'finetune Δ':>11}")
    for r in rows:
        print(f"{r['method']:<12} {str(r['ok']):<5} {r['seconds']:>6} "
              f"{r.get('compress_max_diff', '-')!s:>11} {r.get('finetune_max_diff', '-')!s:>11}")  # fmt: skip


if __name__ == "__main__":
    main()

"""What `--round_to=auto` picks on this machine, and why: latency per MAC by channel alignment.

For each runtime and thread count, `tfkdp.pruning.alignment.measure_alignment`
times its probe (3×3 conv 64 → c, 1×1 conv c → 64, 16×16 input, batch 1) at
channel counts c of exact alignment 1, 2, 4, 8 and 16 (all in 33..64), in
interleaved blocks, and picks the smallest alignment whose median latency per
MAC is within 5 % of the best. No cache: every run measures.

    .venv/bin/python -m benchmarks.alignment

Writes benchmarks/results/alignment.json.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import common  # noqa: E402
from tfkdp import onednn  # noqa: E402
from tfkdp.pruning import alignment  # noqa: E402

RESULTS = os.path.join(common.RESULTS_DIR, "alignment.json")


def main():
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtimes", nargs="+", default=["litert", "onnxruntime"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    rows = []
    for runtime in args.runtimes:
        for threads in args.threads:
            result = alignment.measure_alignment(runtime, threads, repeat=args.repeat, cache_dir=False)
            rows.append(result)
            common.write_json(RESULTS, rows)
            per_mac = result["per_mac_ns"]
            best = min(per_mac.values())
            cells = "  ".join(f"{a}: {v:.4f} ({v / best:.2f})" for a, v in per_mac.items())
            print(f"{runtime:<12} threads={threads}  picks {result['round_to']:>2}   ns/MAC (÷best): {cells}"
                  f"   [{result['seconds']:.0f} s]", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

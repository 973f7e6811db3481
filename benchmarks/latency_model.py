"""How well the latency cost model predicts whole stripped models.

For each zoo model: fit `tfkdp.pruning.latency_model.LatencyModel` on its
runtime (the full model, uniform widths, random plans; interleaved timing),
then measure `--plans` fresh random plans (each group keeps a random share in
[0.2, 1]) and compare measured with predicted p50 latency. The goal of the
"Prune to milliseconds" issue: within 10 %.

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.latency_model --models resnet20

Writes benchmarks/results/latency_model.json and .md (after every model).
Untrained weights: latency does not depend on the values.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from tfkdp import models, onednn  # noqa: E402
from tfkdp.pruning.latency_model import LatencyModel, _counts  # noqa: E402

RESULTS = os.path.join(common.RESULTS_DIR, "latency_model.json")
TABLE = os.path.join(common.RESULTS_DIR, "latency_model.md")


def main():
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--runtime", default="litert", choices=["litert", "onnxruntime"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plans", type=int, default=10, help="random plans measured against the fit")
    parser.add_argument("--repeat", type=int, default=100, help="timed calls per model")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1],
                        help="LatencyModel tile values to fit and check on the same measured plans")
    args = parser.parse_args()
    command = " ".join(["flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.latency_model",
                        *sys.argv[1:]])  # fmt: skip
    results = {"command": command, "runtime": args.runtime, "threads": args.threads,
               "cpu": common.cpu_name(), "models": {}}  # fmt: skip
    for name in args.models:
        model = models.get(name)
        start = time.time()
        lat = LatencyModel(model, runtime=args.runtime, threads=args.threads, repeat=args.repeat,
                           cache_dir=False)  # fmt: skip
        fit_seconds = time.time() - start
        rng = np.random.default_rng(args.seed)
        prunable = [g for g in lat.cost.groups if g.prunable]
        keeps = [{g.id: max(1, int(round(g.size * rng.uniform(0.2, 1.0)))) for g in prunable}
                 for _ in range(args.plans)]  # fmt: skip
        measured = lat.measure(keeps)
        recorded = {_key(m["keep"]): m["measured_ms"] for m in lat.measurements}
        per_tile = {}
        for tile in args.tiles:
            # The same timings, refitted with this tile's features: no second measurement.
            fit = _Replay(recorded, model, runtime=args.runtime, threads=args.threads,
                          repeat=args.repeat, cache_dir=False, tile=tile)  # fmt: skip
            check = fit.compare(keeps, measured)
            per_tile[str(tile)] = {"base_ms": fit.base_ms, "coefficients": fit.coefficients,
                                   "fit_measurements": fit.measurements, "check": check}  # fmt: skip
            print(f"{name} tile {tile}: mean |error| {check['mean_abs_error']:.3f}, "
                  f"max {check['max_abs_error']:.3f}", flush=True)  # fmt: skip
        results["models"][name] = {"fit_seconds": round(fit_seconds, 1), "tiles": per_tile}
        common.write_json(RESULTS, results)
        rows = [{"model": n, "tile": t, "fit s": r["fit_seconds"],
                 "full model ms (predicted)": round(f["base_ms"], 3),
                 "mean abs error": round(f["check"]["mean_abs_error"], 3),
                 "max abs error": round(f["check"]["max_abs_error"], 3)}
                for n, r in results["models"].items() for t, f in r["tiles"].items()]  # fmt: skip
        text = (f"## Latency cost model: predicted vs measured\n\nCommand: `{command}`. "
                f"{args.runtime}, {args.threads} thread(s), batch 1, {args.plans} random plans per "
                f"model (seed {args.seed}), p50 of {args.repeat} interleaved calls; each `tile` is "
                f"fitted to the same calibration timings. CPU: {results['cpu']}.\n\n"
                + common.markdown_table(rows, list(rows[0])) + "\n")  # fmt: skip
        common.write_text(TABLE, text)
        print(text, flush=True)


def _key(keep):
    return json.dumps(sorted(_counts(keep).items()))


class _Replay(LatencyModel):
    """A `LatencyModel` fitted to timings already measured (keyed by plan)."""

    def __init__(self, recorded, *args, **kwargs):
        self._recorded = recorded
        super().__init__(*args, **kwargs)

    def measure(self, keeps):
        return [self._recorded[_key(keep)] for keep in keeps]


if __name__ == "__main__":
    main()

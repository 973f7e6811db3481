"""Worker for `benchmark_latency`: times a SavedModel with TF thread pools set first.

Run as `python -m tfkdp.export._tf_latency --saved_model=DIR --threads=N ...`; prints
one JSON line `{"times_ms": [...], "intra_op": N, "inter_op": 1}`. It is a
separate process because TF fixes its thread pools when the first op runs.
"""

import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--saved_model", required=True)
    parser.add_argument("--input_shape", required=True, help="comma-separated, no batch dim")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input_scaling", default="unit", help="tfkdp.scaling name of the inputs")
    parser.add_argument("--raw_pixels", action="store_true", help="feed raw 0-255 pixels (baked)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    # Before the first op, or TF raises: pools are created once per process.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    from tfkdp.export.latency import _benchmark_input, time_calls
    from tfkdp.export.runners import TensorFlowRunner

    shape = tuple(int(d) for d in args.input_shape.split(","))
    runner = TensorFlowRunner(args.saved_model)
    feed = runner.prepare(
        _benchmark_input(shape, args.batch_size, args.seed, args.input_scaling, args.raw_pixels)
    )
    times = time_calls(runner.run, feed, args.warmup, args.repeat)
    result = {
        "times_ms": times.tolist(),
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Step-time overhead of DDSL's dean over KDP's fixed weights, measured in one process.

For each `dean_every`, the `DeanDistiller` (ADMM + dean) and the plain
`Distiller` (ADMM, fixed weights: KDP's ADMM phase) run the same fixed
batches, interleaved round by round so both see the same machine load; the
ratio of median step times is reported. Goal: ≤ 1.25.

    python -m benchmarks.ddsl --dean-every 5 10 20 --steps 20 --rounds 5

Writes `benchmarks/results/ddsl_step_time.json` and `.md`.

Reference:
    Liu et al., "Learning to explore distillability and sparsability: a
    joint framework for model compression", IEEE TPAMI 2023.
"""

import argparse
import os
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from benchmarks import common
from tfkdp import models, onednn
from tfkdp.distill.dean import Dean, DeanDistiller, ValidationBatch
from tfkdp.distill.distiller import Distiller
from tfkdp.pruning import make_plan
from tfkdp.pruning.sparsity import admm as admm_lib
from tfkdp.train import copy_model
from tfkdp.train.recipe import make_optimizer


def step_time_ratio(teacher, keep, batches, dean_every_values, rounds, learning_rate=0.05):
    """`{dean_every: {kdp_step_ms, ddsl_step_ms, ratio}}`: median step times, interleaved.

    Args:
        teacher: the teacher model (the student is a copy).
        keep: ADMM keep counts `{group_id: k}`.
        batches: a list of `(x, y)` numpy batches of equal size (the last one
            doubles as the dean's held-out batch).
        dean_every_values: the `dean_every` values to time.
        rounds: interleaved timing rounds (each runs all batches once).
        learning_rate: peak learning rate.
    """
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    size = len(batches[0][0])
    fixed = tf.data.Dataset.from_tensor_slices((x, y)).batch(size)
    val = tf.data.Dataset.from_tensor_slices(batches[-1]).batch(size)
    steps = len(batches)
    runs, callbacks = {}, {}
    for name in ["kdp"] + [f"ddsl_{k}" for k in dean_every_values]:
        student = copy_model(teacher)
        admm = admm_lib.ADMM(student, keep)
        if name == "kdp":
            distiller = Distiller(teacher, student, sparsity=admm)
            callbacks[name] = []
        else:
            dean = Dean(batches[-1], total_steps=10**6, dean_every=int(name.split("_")[1]))
            distiller = DeanDistiller(teacher, student, dean=dean, sparsity=admm)
            callbacks[name] = [ValidationBatch(dean, teacher, val)]
        distiller.compile(
            optimizer=make_optimizer(10**6, learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        distiller.fit(fixed.take(2), epochs=1, verbose=0, callbacks=callbacks[name])  # trace
        runs[name] = distiller
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, distiller in runs.items():  # interleaved: all see the same machine load
            start = time.perf_counter()
            distiller.fit(fixed, epochs=1, verbose=0, callbacks=callbacks[name])
            times[name].append((time.perf_counter() - start) / steps)
    kdp = statistics.median(times["kdp"])
    out = {}
    for k in dean_every_values:
        ddsl = statistics.median(times[f"ddsl_{k}"])
        # Paired: each round's ratio against the kdp round run next to it, then their median.
        paired = [d / p for d, p in zip(times[f"ddsl_{k}"], times["kdp"], strict=True)]
        out[k] = {"kdp_step_ms": 1000 * kdp, "ddsl_step_ms": 1000 * ddsl, "ratio": ddsl / kdp,
                  "paired_ratio": statistics.median(paired),
                  "paired_ratios": [round(r, 4) for r in paired]}  # fmt: skip
    return out


def main(argv=None):
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32, help="teacher resnet_cifar depth")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dean-every", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--target", type=float, default=0.5, help="MAC reduction")
    parser.add_argument("--name", default="ddsl_step_time")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(0)
    teacher = models.resnet_cifar(args.depth)
    shape = tuple(teacher.input.shape[1:])
    rng = np.random.default_rng(0)
    batches = [
        (rng.uniform(0, 1, (args.batch_size, *shape)).astype("float32"),
         rng.integers(0, 10, args.batch_size).astype("int64"))
        for _ in range(args.steps)
    ]  # fmt: skip
    plan = make_plan(teacher, target_macs_reduction=args.target)
    keep = {gid: len(k) for gid, k in plan.items()}
    result = step_time_ratio(teacher, keep, batches, args.dean_every, args.rounds)
    payload = {
        "step_time": {str(k): v for k, v in result.items()}, "depth": args.depth,
        "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
        "cpu": common.cpu_name(), "cpu_cores": os.cpu_count(), "goal_ratio": 1.25,
    }  # fmt: skip
    common.write_json(os.path.join(common.RESULTS_DIR, args.name + ".json"), payload)
    lines = ["| dean_every | kdp step (ms) | ddsl step (ms) | ratio of medians | median paired ratio |",
             "|---|---|---|---|---|"]  # fmt: skip
    for k, v in result.items():
        lines.append(f"| {k} | {v['kdp_step_ms']:.1f} | {v['ddsl_step_ms']:.1f} | {v['ratio']:.3f} | "
                     f"{v['paired_ratio']:.3f} |")  # fmt: skip
    with open(os.path.join(common.RESULTS_DIR, args.name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

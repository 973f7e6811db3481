"""Streaming benchmark: does a `dir:` dataset's peak memory stay flat as the folder grows?

Generates folders of 64×64 RGB PNG images (10 class sub-folders, no split
folders: the hash split puts ~80 % in train) of each size in `--sizes`
under a temporary folder, then, in a fresh Python process per size (so one
size's memory cannot count for another's):

1. lists the folder and decodes every file once (`tfkdp.folders.ImageFolder`
   with its preflight check, as the pipeline does);
2. iterates one epoch of the streamed training split
   (`ImageFolder.dataset("train", 128, training=True)`: shuffle of file names,
   decode, resize, augment, batch, prefetch).

It records the process's peak resident set size (`resource.getrusage`
`ru_maxrss`, a high-water mark) after importing TensorFlow, after the listing
and check, and after the epoch, with the time of each step. For comparison it
states what holding the training images in memory as uint8 arrays would take
(N × 64 × 64 × 3 bytes), before any float copy.

Run (from the repository root, with nothing else benchmarking):

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.streaming
    .venv/bin/python -m benchmarks.streaming --sizes 500 2000    # a quick check

Writes benchmarks/results/streaming.json and benchmarks/results/streaming.md.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
CLASSES = 10
SIDE = 64


def generate(root, count, seed=0):
    """`count` 64×64 RGB PNGs in `CLASSES` class folders: a smooth colour field plus noise.

    Smooth fields compress like photos rather than like pure noise, so the
    files' sizes (a few KiB) are realistic for small images.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIDE, dtype=np.float32)
    for label in range(CLASSES):
        os.makedirs(os.path.join(root, f"class_{label:02d}"), exist_ok=True)
    for i in range(count):
        label = i % CLASSES
        base = rng.uniform(0, 255, size=3).astype(np.float32)
        slope = rng.uniform(-80, 80, size=(2, 3)).astype(np.float32)
        image = (base + ramp[:, None, None] * slope[0] + ramp[None, :, None] * slope[1]
                 + rng.normal(0, 6, size=(SIDE, SIDE, 3)))  # fmt: skip
        image = np.clip(image, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, f"class_{label:02d}", f"{i:06d}.png"))


def _peak_mib():
    import resource

    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(root, batch_size):
    """One measurement, run in its own process; prints one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from tfkdp.folders import ImageFolder

    tf.constant(0)  # the runtime is initialised before the baseline is read
    row = {"peak_rss_mib_after_import": _peak_mib()}
    start = time.perf_counter()
    folder = ImageFolder(root, image_size=(SIDE, SIDE), color_mode="rgb", check=True)
    row["list_and_check_s"] = time.perf_counter() - start
    row["peak_rss_mib_after_check"] = _peak_mib()
    row["train_images"] = len(folder.files("train")[0])
    start = time.perf_counter()
    seen = 0
    for images, _ in folder.dataset("train", batch_size, training=True, seed=0):
        seen += int(images.shape[0])
    row["epoch_s"] = time.perf_counter() - start
    row["peak_rss_mib_after_epoch"] = _peak_mib()
    if seen != row["train_images"]:
        raise RuntimeError(f"the epoch gave {seen} images; the train split has {row['train_images']}")
    row["images_per_s"] = seen / row["epoch_s"]
    print(json.dumps(row))


def measure(size, workdir, batch_size):
    root = os.path.join(workdir, f"images_{size}")
    start = time.perf_counter()
    generate(root, size)
    generate_s = time.perf_counter() - start
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "benchmarks.streaming", "--child", root,
               "--batch_size", str(batch_size)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(HERE))  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"measurement of {size} images failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row.update(
        images=size, generate_s=generate_s,
        in_memory_uint8_mib=row["train_images"] * SIDE * SIDE * 3 / 2**20,
    )
    shutil.rmtree(root, ignore_errors=True)
    return row


def to_markdown(result):
    lines = [
        "# Streaming memory of `dir:` datasets",
        "",
        f"64×64 RGB PNGs, {CLASSES} classes, one epoch of the streamed training split at batch "
        f"{result['batch_size']}; peak RSS (`ru_maxrss`) of a fresh process per size. "
        f"Machine: {result['machine']}.",
        "",
        "| images | train images | peak RSS after import (MiB) | after list + check (MiB) "
        "| after epoch (MiB) | in-memory uint8 train (MiB) | check (s) | epoch (s) | images/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['images']} | {r['train_images']} | {r['peak_rss_mib_after_import']:.0f} "
            f"| {r['peak_rss_mib_after_check']:.0f} | {r['peak_rss_mib_after_epoch']:.0f} "
            f"| {r['in_memory_uint8_mib']:.0f} | {r['list_and_check_s']:.1f} "
            f"| {r['epoch_s']:.1f} | {r['images_per_s']:.0f} |"
        )
    rows = result["rows"]
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        growth = large["peak_rss_mib_after_epoch"] - small["peak_rss_mib_after_epoch"]
        lines += [
            "",
            f"From {small['images']} to {large['images']} images ({large['images'] / small['images']:.0f}×) "
            f"the peak RSS after the epoch changed by {growth:+.0f} MiB; holding the training images "
            f"as uint8 arrays would have grown by "
            f"{large['in_memory_uint8_mib'] - small['in_memory_uint8_mib']:.0f} MiB.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    from tfkdp import onednn

    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--workdir", default=None, help="where folders are generated (temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.batch_size)
        return
    if any(s < CLASSES * 10 for s in args.sizes):
        parser.error(f"--sizes must each be >= {CLASSES * 10} (every split needs images)")
    workdir = tempfile.mkdtemp(prefix="tfkdp-streaming-", dir=args.workdir)
    try:
        rows = []
        for size in args.sizes:
            rows.append(measure(size, workdir, args.batch_size))
            r = rows[-1]
            print(f"{size:>7} images: peak RSS {r['peak_rss_mib_after_epoch']:.0f} MiB "
                  f"(after import {r['peak_rss_mib_after_import']:.0f}), epoch {r['epoch_s']:.1f} s",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "benchmark": "streaming", "batch_size": args.batch_size, "image_side": SIDE,
        "classes": CLASSES, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "python -m benchmarks.streaming --sizes " + " ".join(map(str, args.sizes)),
        "rows": rows,
    }  # fmt: skip
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "streaming.json"), "w") as f:
        json.dump(result, f, indent=2)
    markdown = to_markdown(result)
    with open(os.path.join(RESULTS_DIR, "streaming.md"), "w") as f:
        f.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

"""A keras.applications MobileNetV2 on an image folder, trained here, compressed by the default pipeline.

The real run of issue "User data at any size": Fashion-MNIST exported as a
`dir:` folder of 32×32 RGB PNGs (`train/`, `test/`; grey replicated to three
channels, bilinear resize), a `keras.applications.MobileNetV2` (`--alpha`,
`weights=None`, logits) trained on that folder with the house recipe and its
own input scaling (`symmetric`, [-1, 1]), then `tfkdp-compress` with the
default method (`kdp`; another with `--flag=--method=...`) at 50 % MAC reduction on the same folder: teacher vs
student test accuracy, MACs, parameters, and LiteRT float32 latency of both
(1 thread, batch 1, interleaved in the pipeline's latency stage).

    flock /tmp/tfkdp-bench.lock .venv/bin/python -m benchmarks.mobilenet_folder

Writes benchmarks/results/mobilenet_folder.json and .md. The folder, the
teacher and the pipeline run are kept under benchmarks/.cache/ (a rerun
resumes).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import common  # noqa: E402
from tfkdp import onednn  # noqa: E402

SIZE = 32


def export_folder(path, limit_train=0, limit_test=0):
    """Fashion-MNIST as `path/{train,test}/<class>/<index>.png`, 32×32 RGB; written once (temp + rename)."""
    import shutil

    import tensorflow as tf

    if os.path.isdir(path):
        return path
    (x_train, y_train), (x_test, y_test) = common.load_fashion_mnist_arrays()
    splits = {"train": (x_train, y_train, limit_train), "test": (x_test, y_test, limit_test)}
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, (x, y, limit) in splits.items():
        if limit:
            x, y = x[:limit], y[:limit]
        for label in range(10):
            os.makedirs(os.path.join(tmp, split, str(label)), exist_ok=True)
        for start in range(0, len(x), 1000):
            batch = tf.convert_to_tensor(x[start : start + 1000][..., None])
            rgb = tf.image.grayscale_to_rgb(tf.image.resize(batch, (SIZE, SIZE), "bilinear"))
            rgb = tf.cast(tf.clip_by_value(tf.round(rgb), 0, 255), tf.uint8)
            for i, image in enumerate(rgb):
                index = start + i
                tf.io.write_file(os.path.join(tmp, split, str(int(y[index])), f"{index}.png"),
                                 tf.io.encode_png(image))  # fmt: skip
    os.replace(tmp, path)
    return path


def train_teacher(folder, path, alpha, epochs, learning_rate, batch_size, seed):
    """A MobileNetV2 trained on the folder's train split (symmetric scaling); saved once to `path`."""
    import keras

    from tfkdp.folders import ImageFolder
    from tfkdp.train import phases

    if os.path.exists(path):
        return path, None
    keras.utils.set_random_seed(seed)
    images = ImageFolder(folder, (SIZE, SIZE), "rgb")
    train = images.dataset("train", batch_size, training=True, seed=seed, scaling="symmetric")
    model = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), alpha=alpha, weights=None,
                                           classes=10, classifier_activation=None)  # fmt: skip
    start = time.time()
    phases.finetune(model, train, None, epochs, phases.Training(learning_rate=learning_rate, verbose=2),
                    "teacher")  # fmt: skip
    # As the pipeline's teacher stage does: momentum-0.999 moving statistics lag behind 5 epochs.
    phases.recalibrate(model, train, phases.Training())
    seconds = time.time() - start
    model.save(path + ".tmp.keras")
    os.replace(path + ".tmp.keras", path)
    return path, seconds


def first_epoch_penalty(run_dir):
    """The first compress epoch's mean `sparsity_loss`, `student_loss` and their ratio, or None.

    Read from the run's `state.json` (the compress stage's history); None for a
    method without an ADMM phase.
    """
    with open(os.path.join(run_dir, "state.json")) as f:
        state = json.load(f)
    history = state.get("completed", {}).get("compress", {}).get("summary", {}).get("history", {})
    admm = history.get("admm") or {}
    if not admm.get("sparsity_loss") or not admm.get("student_loss"):
        return None
    penalty, task = admm["sparsity_loss"][0], admm["student_loss"][0]
    return {"sparsity_loss": penalty, "student_loss": task, "ratio": penalty / task}


def main():
    onednn.disable_for_entry_point()  # plans and timings must not depend on the CPU
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--teacher-lr", type=float, default=0.05)
    parser.add_argument("--compress-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=0, help="0 = all 60 000")
    parser.add_argument("--test-images", type=int, default=0, help="0 = all 10 000")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latency-repeat", type=int, default=200)
    parser.add_argument("--workdir", default=os.path.join(common.CACHE_DIR, "mobilenet_folder"))
    parser.add_argument("--name", default="mobilenet_folder")
    parser.add_argument("--flag", action="append", default=[], metavar="--FLAG=VALUE",
                        help="one more tfkdp-compress flag (repeatable), e.g. --flag=--method=mskd; "
                             "the run goes to its own folder, named after --name")  # fmt: skip
    args = parser.parse_args()

    from benchmarks.latency_budget import pipeline_values
    from tfkdp.pipelines import workflow

    start = time.time()
    tag = f"{args.train_images or 60000}_{args.test_images or 10000}"
    folder = export_folder(os.path.join(args.workdir, f"fmnist{SIZE}rgb_{tag}"),
                           args.train_images, args.test_images)  # fmt: skip
    teacher_path = os.path.join(args.workdir, f"mnv2_a{args.alpha:g}_e{args.teacher_epochs}_{tag}.keras")
    teacher_path, teacher_seconds = train_teacher(folder, teacher_path, args.alpha, args.teacher_epochs,
                                                  args.teacher_lr, args.batch_size, 0)  # fmt: skip
    out = os.path.join(args.workdir, f"run_{tag}" + (f"_{args.name}" if args.flag else ""))
    values = pipeline_values([
        f"--teacher={teacher_path}", f"--dataset=dir:{folder}", "--input_scaling=symmetric",
        "--target_macs_reduction=0.5", f"--compress_epochs={args.compress_epochs}",
        f"--finetune_epochs={args.finetune_epochs}", f"--batch_size={args.batch_size}",
        "--formats=tflite,tflite_int8", "--threads=1", f"--latency_repeat={args.latency_repeat}",
        f"--output_dir={out}", *args.flag,
    ])  # fmt: skip
    try:
        workflow.run(values)
    except workflow.ArtifactsRejectedError as error:  # the report exists; say which failed
        print(f"rejected artifacts: {sorted(error.rejected)}", flush=True)
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    teacher, student = report["teacher"], report["student"]
    rows = {(r["format"], str(r["threads"])): r for r in report.get("latency_comparison", [])}
    side = rows.get(("tflite", "1"), {})
    int8 = next((a for a in report["artifacts"] if a["format"] == "tflite_int8"), {})
    result = {
        "command": " ".join(["python -m benchmarks.mobilenet_folder", *sys.argv[1:]]),
        "setup": {**vars(args), "cpu": common.cpu_name(), "cpu_cores": os.cpu_count(),
                  "round_to": report["flags"].get("round_to")},
        "teacher": {"accuracy": teacher["accuracy"], "macs": teacher["macs"], "params": teacher["params"],
                    "train_seconds": teacher_seconds, "litert_p50_ms": side.get("teacher_p50_ms")},
        "student": {"accuracy": student["accuracy"], "macs": student["macs"], "params": student["params"],
                    "litert_p50_ms": side.get("student_p50_ms"),
                    "int8_accuracy": int8.get("accuracy"), "int8_p50_ms": int8.get("latency_ms_p50")},
        "speedup": side.get("speedup"), "speedup_over_mac_speedup": side.get("speedup_over_mac_speedup"),
        "stages": report.get("stages"), "rejected": [{"format": r["format"], "runtime": r.get("runtime"), "n": r.get("n"),
                      "accuracy": r.get("accuracy"), "top1_agreement": r.get("top1_agreement"),
                      "failed_checks": r.get("failed_checks"), "error": r.get("error") or r.get("reason")}
                     for r in report.get("rejected", [])],
        "wall_seconds": round(time.time() - start, 1),
        "first_epoch_penalty": first_epoch_penalty(out),
    }  # fmt: skip
    common.write_json(os.path.join(common.RESULTS_DIR, args.name + ".json"), result)
    t, s = result["teacher"], result["student"]
    checks = [f"{r['format']}: {c['metric']} {c['measured']:.4g} (allowed {c['allowed']:.4g})"
              for r in result["rejected"] for c in (r["failed_checks"] or [])]  # fmt: skip
    rejected = f" (rejected: {'; '.join(checks) or result['rejected']})" if result["rejected"] else ""  # fmt: skip
    table = (
        "| model | test acc % | MACs (M) | params (k) | LiteRT float32 p50 (ms) |\n|---|---|---|---|---|\n"
        f"| MobileNetV2 α={args.alpha:g} teacher | {100 * t['accuracy']:.2f} | {t['macs'] / 1e6:.2f} "
        f"| {t['params'] / 1e3:.1f} | {t['litert_p50_ms']:.3f} |\n"
        f"| {report['flags']['method']} student (50 % MACs) | {100 * s['accuracy']:.2f} | {s['macs'] / 1e6:.2f} "
        f"| {s['params'] / 1e3:.1f} | {s['litert_p50_ms']:.3f} |\n\n"
        f"Speedup {result['speedup']:.2f}× (÷ MAC speedup: {result['speedup_over_mac_speedup']:.2f}); "
        f"int8 student accuracy {100 * (s['int8_accuracy'] or float('nan')):.2f} %{rejected}. "
        f"Wall time {result['wall_seconds']:.0f} s.\n"
    )
    penalty = result["first_epoch_penalty"]
    if penalty:
        table += (f"\nFirst compress epoch: sparsity_loss {penalty['sparsity_loss']:.3g}, student_loss "
                  f"{penalty['student_loss']:.3g}, ratio {penalty['ratio']:.3g}.\n")  # fmt: skip
    common.write_text(os.path.join(common.RESULTS_DIR, args.name + ".md"), table)
    print(table, flush=True)


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: real data, one cached teacher, step timing, result files.

The teacher is trained once per (architecture, width, epochs, seed) and cached
under `benchmarks/.cache/`; a file lock makes concurrent benchmark scripts wait
for one training instead of each starting its own.
"""

import fcntl
import json
import os
import tempfile
import time

import keras
import numpy as np

from tfkdp import data, metrics, models
from tfkdp.export._atomic import write_bytes_atomic
from tfkdp.train import recipe as training

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE_DIR = os.path.join(HERE, ".cache")
# Teachers kept in the repository (trained here by `get_teacher`, then committed), so that
# every session's recipe rows distil from the very same teacher.
TEACHERS_DIR = os.path.join(HERE, "teachers")
RESULTS_DIR = os.path.join(HERE, "results")

_ARRAYS = {}


def load_fashion_mnist_arrays():
    """`((x_train, y_train), (x_test, y_test))` of real Fashion-MNIST, uint8, loaded once."""
    if "fmnist" not in _ARRAYS:
        _ARRAYS["fmnist"] = data.load_fashion_mnist()
    return _ARRAYS["fmnist"]


def datasets(batch_size=128, seed=0, train_subset=None):
    """Augmented training and plain test `tf.data` pipelines of real Fashion-MNIST."""
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist_arrays()
    if train_subset:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    train = data.make_dataset(x_train, y_train, batch_size, training=True, seed=seed)
    test = data.make_dataset(x_test, y_test, 512)
    return train, test


def test_accuracy(model):
    (_, _), (x_test, y_test) = load_fashion_mnist_arrays()
    return metrics.accuracy(model, data.preprocess(x_test).numpy(), y_test, batch_size=512)


def kept_or_trained(stem, train):
    """`(model, info)` of `benchmarks/teachers/<stem>.keras` (+ `.json`) when kept, else trained once.

    `train()` returns `(model, info)`; its result is cached under
    `benchmarks/.cache/<stem>.keras` (+ `.json`, written atomically), and a file
    lock makes concurrent benchmark scripts wait for one training instead of
    each starting its own.
    """
    kept = os.path.join(TEACHERS_DIR, stem)
    if os.path.exists(kept + ".keras") and os.path.exists(kept + ".json"):
        with open(kept + ".json") as f:
            info = json.load(f)
        return keras.saving.load_model(kept + ".keras"), info
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, stem + ".keras")
    info_path = os.path.join(CACHE_DIR, stem + ".json")
    with open(os.path.join(CACHE_DIR, stem + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.exists(path) and os.path.exists(info_path)):
            model, info = train()
            fd, tmp = tempfile.mkstemp(suffix=".keras", dir=CACHE_DIR)
            os.close(fd)
            model.save(tmp)
            os.replace(tmp, path)
            write_json(info_path, info)
    with open(info_path) as f:
        info = json.load(f)
    return keras.saving.load_model(path), info


def keep(stem):
    """Copies the cached `benchmarks/.cache/<stem>` model into `benchmarks/teachers/` to be committed.

    Saved uncompiled (weights and batch-norm statistics, no optimizer state:
    about half the size for SGD with momentum), with its `.json`; later runs of
    `kept_or_trained(stem, ...)` on any machine load it instead of training.

        .venv/bin/python -c "from benchmarks import common; common.keep('granularity_resnet20_e6_n10000')"
    """
    model = keras.saving.load_model(os.path.join(CACHE_DIR, stem + ".keras"))
    bare = model.__class__.from_config(model.get_config())
    bare.set_weights(model.get_weights())
    os.makedirs(TEACHERS_DIR, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=TEACHERS_DIR)
    os.close(fd)
    bare.save(tmp)
    os.chmod(tmp, 0o644)
    with open(os.path.join(CACHE_DIR, stem + ".json")) as f:
        info = json.load(f)
    write_json(os.path.join(TEACHERS_DIR, stem + ".json"), info)
    os.replace(tmp, os.path.join(TEACHERS_DIR, stem + ".keras"))
    return os.path.join(TEACHERS_DIR, stem + ".keras")


def get_teacher(name="resnet32", epochs=4, width=16, seed=0, learning_rate=0.1, batch_size=128):
    """A teacher trained on real Fashion-MNIST: the repository's copy, else cached on disk.

    `benchmarks/teachers/<stem>.keras` (with its `.json`) is used when present;
    otherwise the teacher is trained once and cached under `benchmarks/.cache/`
    (`kept_or_trained`).

    Returns:
        `(model, info)` where info holds `test_accuracy`, `train_seconds`,
        `epochs`, `macs`, `params`.
    """
    stem = f"{name}_w{width}_e{epochs}_s{seed}"

    def train():
        keras.utils.set_random_seed(seed)
        model = models.get(name, width=width)
        train_data, test = datasets(batch_size, seed)
        start = time.time()
        # Checkpointed every epoch: a killed run (or a session that ends) resumes here.
        backup = keras.callbacks.BackupAndRestore(os.path.join(CACHE_DIR, stem + ".backup"))
        training.train_classifier(model, train_data, test, epochs=epochs, learning_rate=learning_rate,
                                  verbose=2, callbacks=[backup])  # fmt: skip
        return model, {
            "name": name, "width": width, "epochs": epochs, "seed": seed,
            "train_seconds": round(time.time() - start, 1),
            "test_accuracy": test_accuracy(model),
            "macs": metrics.count_macs(model), "params": metrics.count_params(model),
        }  # fmt: skip

    return kept_or_trained(stem, train)


def narrow_resnet(depth, target_macs, max_width):
    """The resnet of this depth whose MACs are closest to `target_macs` (width search)."""
    best = None
    for width in range(4, max_width + 1):
        macs = metrics.count_macs(models.resnet_cifar(depth, width=width))
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (width, macs)
    keras.backend.clear_session()
    return best


def timed_step_ends(model, data, steps, warmup):
    """`time.perf_counter()` at the end of each timed `model.fit` step, from the last warm-up one.

    Runs `warmup + steps` steps of one epoch of `model.fit(data)` (a compiled
    model, a repeating dataset). Each step's loss value is read before its time
    is taken: it forces the step to finish (GPU work is asynchronous).

    Returns:
        A list of seconds: `steps + 1` ends when `warmup` > 0 (the first is
        the last warm-up step's), else `steps`; `np.diff` of it gives the
        step times.
    """
    ends = []

    class _Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(keras.ops.convert_to_numpy(logs["loss"]))
            ends.append(time.perf_counter())

    model.fit(data, epochs=1, steps_per_epoch=warmup + steps, callbacks=[_Clock()], verbose=0)
    return ends[warmup - 1 :] if warmup else ends


def write_json(path, payload):
    """Writes JSON atomically (temp file in the same folder, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_bytes_atomic(path, json.dumps(payload, indent=2, default=_jsonable).encode("utf-8"))


def write_text(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_bytes_atomic(path, text.encode("utf-8"))


def cpu_name():
    """The CPU model name, for benchmark headers."""
    from tfkdp.pruning.alignment import cpu_model

    return cpu_model()


def markdown_table(rows, columns):
    """Rows (dicts) as a Markdown table with the given column keys."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

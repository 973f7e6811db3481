"""Data: Fashion-MNIST (validated idx files), image folders, `.npz`, and `tf.data` pipelines."""

import gzip
import os
import struct

import numpy as np
import tensorflow as tf
from absl import logging

__all__ = [
    "DEBIAN_DIR",
    "FASHION_MNIST_FILES",
    "load_fashion_mnist",
    "from_directory",
    "from_npz",
    "count_nonfinite",
    "make_dataset",
    "validation_split",
    "preprocess",
    "load_dataset",
    "DATASET_KINDS",
]

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
_EXPECTED_COUNTS = {"x_train": 60000, "y_train": 60000, "x_test": 10000, "y_test": 10000}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_HOW_TO_GET = (
    "Get the data one of two ways: (1) as root on Debian/Ubuntu, "
    "`apt-get install dataset-fashion-mnist` (installs it under "
    f"{DEBIAN_DIR}); or (2) with network access, "
    "`python -c 'import keras; keras.datasets.fashion_mnist.load_data()'` "
    "(caches it under ~/.keras/datasets/fashion-mnist). Or point $TFKDP_DATA_DIR "
    "at a folder holding the four idx .gz files."
)


def _read_idx(path, expected_magic, expected_count):
    """Reads one gzipped idx file and validates header, size and count."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"Fashion-MNIST file {path} is not a readable gzip file: {error}") from error
    header_len = 8 if expected_magic == _IDX_LABELS_MAGIC else 16
    if len(data) < header_len:
        raise ValueError(f"Fashion-MNIST file {path} is truncated: {len(data)} bytes, no idx header")
    magic, count = struct.unpack(">II", data[:8])
    if magic != expected_magic:
        raise ValueError(
            f"Fashion-MNIST file {path} has idx magic number {magic}; expected {expected_magic}"
        )
    if count != expected_count:
        raise ValueError(f"Fashion-MNIST file {path} holds {count} items; expected {expected_count}")
    if expected_magic == _IDX_IMAGES_MAGIC:
        rows, cols = struct.unpack(">II", data[8:16])
        shape = (count, rows, cols)
    else:
        shape = (count,)
    body = np.frombuffer(data, dtype=np.uint8, offset=header_len)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"Fashion-MNIST file {path} is truncated or padded: {body.size} data bytes, "
            f"expected {int(np.prod(shape))} for shape {shape}"
        )
    return body.reshape(shape)


def _candidate_dirs():
    dirs = []
    if os.environ.get("TFKDP_DATA_DIR"):
        dirs.append(("$TFKDP_DATA_DIR", os.environ["TFKDP_DATA_DIR"]))
    dirs.append(("Debian dataset-fashion-mnist", DEBIAN_DIR))
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    dirs.append(("Keras cache", os.path.join(keras_home, "datasets", "fashion-mnist")))
    return dirs


def _load_dir(directory):
    arrays = {}
    for key, filename in FASHION_MNIST_FILES.items():
        magic = _IDX_IMAGES_MAGIC if key.startswith("x") else _IDX_LABELS_MAGIC
        arrays[key] = _read_idx(os.path.join(directory, filename), magic, _EXPECTED_COUNTS[key])
    for key in ("y_train", "y_test"):
        if arrays[key].max() > 9:
            raise ValueError(
                f"Fashion-MNIST labels in {os.path.join(directory, FASHION_MNIST_FILES[key])} "
                f"must lie in [0, 9]; found {int(arrays[key].max())}"
            )
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def load_fashion_mnist(download=True):
    """Loads Fashion-MNIST as uint8 arrays, from the first place that has it.

    Looks in order at `$TFKDP_DATA_DIR`, `/usr/share/datasets/fashion-mnist`
    (Debian's `dataset-fashion-mnist`), `~/.keras/datasets/fashion-mnist`, and
    finally asks Keras to download it. Every file is validated (idx magic
    number, item count, byte count, label range).

    Args:
        download: allow the final Keras download attempt.

    Returns:
        `((x_train, y_train), (x_test, y_test))`; images `uint8` of shape
        `(N, 28, 28)`, labels `uint8` of shape `(N,)`.

    Raises:
        FileNotFoundError: if no place has the data, listing every place tried
            and how to get it.
        ValueError: if a file is present but truncated or corrupt (naming it).

    Example:
        >>> (x, y), _ = load_fashion_mnist()  # doctest: +SKIP
        >>> x.shape, y.shape  # doctest: +SKIP
        ((60000, 28, 28), (60000,))
    """
    tried = []
    for label, directory in _candidate_dirs():
        present = [os.path.exists(os.path.join(directory, f)) for f in FASHION_MNIST_FILES.values()]
        if all(present):
            logging.info("Loading Fashion-MNIST from %s (%s)", directory, label)
            return _load_dir(directory)
        tried.append(f"{directory} ({label}): " + ("missing" if not any(present) else "incomplete"))
    if download:
        try:
            import keras

            logging.info("Fashion-MNIST not found locally; trying keras.datasets download")
            (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
            return (x_train, y_train), (x_test, y_test)
        except Exception as error:  # noqa: BLE001 - any download failure ends in the same advice
            tried.append(f"keras.datasets.fashion_mnist download: {type(error).__name__}: {error}")
    else:
        tried.append("keras.datasets download: not attempted (download=False)")
    raise FileNotFoundError(
        "Fashion-MNIST was not found. Tried:\n  - " + "\n  - ".join(tried) + "\n" + _HOW_TO_GET
    )


def count_nonfinite(x, chunk=1 << 22):
    """Number of NaN/inf values in array `x` (0 for integer arrays, which cannot hold them).

    Scans in chunks of `chunk` values, so the temporary mask stays small for
    a large image array.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.inexact):
        return 0
    flat = x.reshape(-1)
    return int(sum(flat[i : i + chunk].size - np.count_nonzero(np.isfinite(flat[i : i + chunk]))
                   for i in range(0, flat.size, chunk)))


def from_npz(path):
    """Loads `((x_train, y_train), (x_test, y_test))` from an `.npz` file.

    Args:
        path: file with keys `x_train, y_train, x_test, y_test`; images of
            rank 3 `(N, H, W)` or 4 `(N, H, W, C)`, integer labels of rank 1.

    Returns:
        The four arrays as numpy arrays, nested as Keras datasets are.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: for missing keys, wrong ranks, non-integer labels,
            NaN/inf images, or image/label counts that differ.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz dataset file not found: {path!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path!r} is not a readable .npz file: {error}") from error
    with archive:
        missing = [k for k in FASHION_MNIST_FILES if k not in archive.files]
        if missing:
            raise ValueError(
                f"npz dataset {path!r} lacks keys {missing}; it must hold "
                f"x_train, y_train, x_test, y_test (found {sorted(archive.files)})"
            )
        arrays = {k: archive[k] for k in FASHION_MNIST_FILES}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (3, 4):
            raise ValueError(
                f"x_{split} in {path!r} must have rank 3 (N,H,W) or 4 (N,H,W,C); got shape {x.shape}"
            )
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise ValueError(f"x_{split} in {path!r} must be numeric; got dtype {x.dtype}")
        bad = count_nonfinite(x)
        if bad:
            raise ValueError(
                f"x_{split} in {path!r} has {bad} NaN/inf values (of {x.size}); images must be "
                "finite numbers"
            )
        y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"y_{split} in {path!r} must be integer class labels of shape (N,); "
                f"got shape {y.shape} dtype {y.dtype}"
            )
        if len(x) != len(y):
            raise ValueError(f"x_{split} has {len(x)} items but y_{split} has {len(y)} in {path!r}")
        if y.size and y.min() < 0:
            raise ValueError(f"y_{split} in {path!r} has negative labels (min {int(y.min())})")
        arrays[f"y_{split}"] = y
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"x_train and x_test in {path!r} differ in image shape: "
            f"{arrays['x_train'].shape[1:]} vs {arrays['x_test'].shape[1:]}"
        )
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def from_directory(path, image_size=(28, 28), color_mode="grayscale", batch_size=None, seed=0):
    """Loads an image-folder dataset (`path/<class_name>/*.png|jpg`) as arrays.

    Uses `keras.utils.image_dataset_from_directory`; class indices follow the
    sorted folder names.

    Args:
        path: root folder with one sub-folder per class.
        image_size: `(height, width)` images are resized to.
        color_mode: `"grayscale"`, `"rgb"` or `"rgba"`.
        batch_size: unused for arrays; kept `None`.
        seed: shuffle seed of the loader.

    Returns:
        `(x, y, class_names)`: `uint8` images `(N, H, W, C)`, `int64` labels.

    Raises:
        FileNotFoundError: if `path` is not a directory.
        ValueError: if it holds no images.
    """
    import keras

    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder dataset not found: {path!r} is not a directory")
    dataset = keras.utils.image_dataset_from_directory(
        path, labels="inferred", label_mode="int", color_mode=color_mode,
        image_size=tuple(image_size), batch_size=batch_size, shuffle=False, seed=seed,
        verbose=False,
    )
    class_names = list(dataset.class_names)
    xs, ys = [], []
    for x, y in dataset.as_numpy_iterator():
        xs.append(np.clip(np.round(x), 0, 255).astype(np.uint8))
        ys.append(np.asarray(y).astype(np.int64))
    if not xs:
        raise ValueError(f"image folder {path!r} contains no images")
    return np.stack(xs), np.asarray(ys), class_names


def validation_split(x, y, fraction=0.1, seed=0):
    """Splits arrays into a training part and a held-out validation part.

    Args:
        x, y: arrays with the same first dimension.
        fraction: share held out, in (0, 1).
        seed: permutation seed; the split is deterministic for a seed.

    Returns:
        `((x_train, y_train), (x_val, y_val))`.

    Raises:
        ValueError: for a fraction outside (0, 1) or mismatched lengths.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1); received fraction={fraction!r}")
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(len(x) * fraction)))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def _as_float_images(x):
    x = tf.convert_to_tensor(x)
    if x.shape.rank == 3:
        x = x[..., None]
    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32) / 255.0
    return tf.cast(x, tf.float32)


def preprocess(x, mean=None, std=None):
    """Scales images to float32 in [0, 1] (uint8 input) and standardises them.

    Adds a channel axis to rank-3 input. `mean`/`std` are scalars or
    per-channel values; `None` leaves the [0, 1] scale. Works on numpy arrays
    and tensors; used by `make_dataset` and by exporters' calibration.
    """
    x = _as_float_images(x)
    if mean is not None:
        x = x - tf.constant(mean, tf.float32)
    if std is not None:
        x = x / tf.constant(std, tf.float32)
    return x


def make_dataset(
    x,
    y,
    batch_size=128,
    training=False,
    augment=None,
    pad=2,
    flip=True,
    mean=None,
    std=None,
    seed=0,
    drop_remainder=False,
):
    """A `tf.data` pipeline: shuffle, augment, normalise, batch, prefetch.

    Args:
        x: images, `(N, H, W)` or `(N, H, W, C)`, uint8 (scaled to [0, 1]) or float.
        y: integer labels `(N,)`.
        batch_size: batch size.
        training: shuffle each epoch and (by default) augment.
        augment: augment with pad-and-random-crop and horizontal flips;
            defaults to `training`.
        pad: pixels of zero padding before the random crop (0 disables it).
        flip: random horizontal flips.
        mean, std: standardisation after scaling (scalars or per channel).
        seed: seed of shuffling and augmentation; the same seed gives the same
            batches.
        drop_remainder: drop the last partial batch.

    Returns:
        A `tf.data.Dataset` of `(images float32 (B, H, W, C), labels int32 (B,))`.

    Raises:
        ValueError: if lengths differ, `batch_size` < 1 or `pad` < 0.

    Example:
        >>> ds = make_dataset(np.zeros((8, 28, 28), "uint8"), np.zeros(8, "int32"), 4)
        >>> [tuple(b[0].shape) for b in ds]
        [(4, 28, 28, 1), (4, 28, 28, 1)]
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; received batch_size={batch_size!r}")
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0; received pad={pad!r}")
    augment = training if augment is None else augment
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    y = np.asarray(y).astype(np.int32).reshape(-1)
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    if augment and (pad or flip):
        # Per-image stateless ops keyed by a seeded random stream: every image
        # gets its own crop/flip, and the same seed replays the same epochs.
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

        def _augment(example, key):
            image, label = example
            key = tf.cast(key, tf.int32)
            if pad:
                image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
                image = tf.image.stateless_random_crop(image, (height, width, channels), seed=key)
            if flip:
                image = tf.image.stateless_random_flip_left_right(image, seed=key[::-1])
            return image, label

        dataset = tf.data.Dataset.zip((dataset, keys)).map(
            _augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    dataset = dataset.batch(int(batch_size), drop_remainder=drop_remainder)
    dataset = dataset.map(
        lambda images, labels: (preprocess(images, mean, std), labels),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )

    return dataset.prefetch(tf.data.AUTOTUNE)


DATASET_KINDS = ("fashion_mnist", "npz:PATH", "dir:PATH")


def load_dataset(spec, test_fraction=0.2, seed=0):
    """Loads a dataset named by a spec string, as used by the command-line tools.

    Args:
        spec: `"fashion_mnist"`, `"npz:PATH"` (see `from_npz`) or `"dir:PATH"`
            (image folders, see `from_directory`; a `test_fraction` share is held
            out as the test split).
        test_fraction: test share for `dir:` datasets.
        seed: split seed for `dir:` datasets.

    Returns:
        `((x_train, y_train), (x_test, y_test), num_classes)` with images as
        `(N, H, W, C)` arrays.

    Raises:
        ValueError: for a spec of another form, listing the allowed ones.
        FileNotFoundError: when the data is not where the spec says.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"dataset must be one of {DATASET_KINDS}; received {spec!r}")
    if spec == "fashion_mnist":
        (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    elif spec.startswith("npz:") and len(spec) > 4:
        (x_train, y_train), (x_test, y_test) = from_npz(spec[4:])
    elif spec.startswith("dir:") and len(spec) > 4:
        x, y, _ = from_directory(spec[4:])
        (x_train, y_train), (x_test, y_test) = validation_split(x, y, test_fraction, seed)
    else:
        raise ValueError(f"dataset must be one of {DATASET_KINDS}; received {spec!r}")
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return (x_train, y_train), (x_test, y_test), num_classes

"""Data: Fashion-MNIST (validated idx files), CIFAR pickles, `.npz`, image folders, `tf.data`."""

import gzip
import os
import pickle
import struct

import numpy as np
import tensorflow as tf
from absl import logging

from tfkdp.batching import batch_images, preprocess, to_pixels

__all__ = [
    "DEBIAN_DIR",
    "FASHION_MNIST_FILES",
    "load_fashion_mnist",
    "from_directory",
    "from_npz",
    "load_cifar",
    "batch_images",
    "count_nonfinite",
    "make_dataset",
    "validation_split",
    "preprocess",
    "to_pixels",
    "load_dataset",
    "parse_spec",
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


_CIFAR = {
    # kind: (folder the archive unpacks to, {split: [files]}, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "labels", 10,
    ),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "fine_labels", 100),
}
# What the CIFAR pickles may reference: numpy arrays and their dtypes, nothing else.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads only plain containers and numpy arrays: a pickle cannot run code through it."""

    def find_class(self, module, name):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")


def _read_cifar_batch(path, label_key, num_classes):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR file not found: {path!r}")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"CIFAR file {path!r} is not a readable python pickle: {error}") from error
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR file {path!r} holds a {type(batch).__name__}, not a dict")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"CIFAR file {path!r} lacks the key {key!r} (has {sorted(batch)})")
    x = np.asarray(batch["data"])
    y = np.asarray(batch[label_key]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR file {path!r}: 'data' must be uint8 of shape (N, 3072); got {x.dtype} {x.shape}"
        )
    if len(y) != len(x):
        raise ValueError(f"CIFAR file {path!r} has {len(x)} images but {len(y)} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"CIFAR file {path!r} has labels outside [0, {num_classes - 1}]: "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int64)


def load_cifar(kind, path):
    """Loads CIFAR-10 or CIFAR-100 from the python-pickle folder users download.

    Args:
        kind: `"cifar10"` (`cifar-10-batches-py/`: `data_batch_1`..`5`,
            `test_batch`, key `labels`) or `"cifar100"` (`cifar-100-python/`:
            `train`, `test`, key `fine_labels`: 100 classes).
        path: that folder, or the folder holding it (where the archive was
            unpacked).

    Returns:
        `((x_train, y_train), (x_test, y_test))`: uint8 `(N, 32, 32, 3)`
        images, int64 labels.

    Raises:
        ValueError: for another `kind`, or a file that is not a CIFAR pickle.
        FileNotFoundError: naming the first missing file.

    Example:
        >>> (x, y), _ = load_cifar("cifar10", "~/data/cifar-10-batches-py")  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        (50000, 32, 32, 3)
    """
    if kind not in _CIFAR:
        raise ValueError(f"kind must be one of {sorted(_CIFAR)}; received {kind!r}")
    folder, files, label_key, classes = _CIFAR[kind]
    path = os.path.expanduser(path)
    if os.path.isdir(os.path.join(path, folder)):
        path = os.path.join(path, folder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{kind} folder not found: {path!r} (expected {folder}/)")
    splits = []
    for split in ("train", "test"):
        parts = [_read_cifar_batch(os.path.join(path, name), label_key, classes)
                 for name in files[split]]  # fmt: skip
        splits.append((np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])))
    return tuple(splits)


def from_directory(path, image_size=(28, 28), color_mode="grayscale", batch_size=None, seed=0):
    """Loads a small image-folder dataset (`path/<class_name>/*.png|jpg`) into memory as arrays.

    Uses `keras.utils.image_dataset_from_directory`; class indices follow the
    sorted folder names. For folders of any size, with split sub-folders,
    checked files and streaming from disk, use `tfkdp.folders.ImageFolder`
    (what `--dataset=dir:PATH` uses).

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
    scaling="unit",
):
    """A `tf.data` pipeline: shuffle, augment, scale, batch, prefetch.

    Args:
        x: images, `(N, H, W)` or `(N, H, W, C)`, uint8 pixels (scaled by
            `scaling`) or float in [0, 1] (see `preprocess`).
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
        scaling: input scaling (`tfkdp.scaling.names()`): `"unit"` [0, 1]
            (default), `"raw"` 0–255, `"symmetric"` [−1, 1], `"caffe"`
            (BGR, ImageNet means subtracted), `"torch"` (ImageNet mean/std).

    Returns:
        A `tf.data.Dataset` of `(images float32 (B, H, W, C), labels int32 (B,))`.

    Raises:
        ValueError: if lengths differ, `batch_size` < 1, `pad` < 0, or
            `scaling` is unknown (listing the valid names).

    Example:
        >>> ds = make_dataset(np.zeros((8, 28, 28), "uint8"), np.zeros(8, "int32"), 4)
        >>> [tuple(b[0].shape) for b in ds]
        [(4, 28, 28, 1), (4, 28, 28, 1)]
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    x = np.asarray(x)  # batch_size and pad are checked by batch_images
    if x.ndim == 3:
        x = x[..., None]
    y = np.asarray(y).astype(np.int32).reshape(-1)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return batch_images(
        dataset, x.shape[1:], batch_size, training=training, augment=augment, pad=pad, flip=flip,
        mean=mean, std=std, seed=seed, drop_remainder=drop_remainder, scaling=scaling,
    )  # fmt: skip


DATASET_KINDS = ("fashion_mnist", "npz:PATH", "cifar10:PATH", "cifar100:PATH", "dir:PATH")


def parse_spec(spec):
    """Splits a dataset spec into `(kind, path)`: `("fashion_mnist", None)`, `("dir", "imgs")`, ...

    Raises:
        ValueError: for a spec of another form, listing the allowed ones.
    """
    if isinstance(spec, str) and spec == "fashion_mnist":
        return "fashion_mnist", None
    if isinstance(spec, str) and ":" in spec:
        kind, path = spec.split(":", 1)
        if kind in ("npz", "dir", *_CIFAR) and path:
            return kind, path
    raise ValueError(f"dataset must be one of {DATASET_KINDS}; received {spec!r}")


def load_dataset(spec, image_size=(28, 28), color_mode="grayscale"):
    """Loads a dataset named by a spec string into memory, as arrays.

    The pipeline streams `dir:` folders instead (`tfkdp.folders.ImageFolder`);
    this loads every image of one, for small folders and scripts.

    Args:
        spec: `"fashion_mnist"`, `"npz:PATH"` (see `from_npz`),
            `"cifar10:PATH"`/`"cifar100:PATH"` (see `load_cifar`) or
            `"dir:PATH"` (see `tfkdp.folders.ImageFolder`: its train and val
            splits are returned as the training arrays).
        image_size, color_mode: what `dir:` images are resized and converted to.

    Returns:
        `((x_train, y_train), (x_test, y_test), num_classes)` with images as
        `(N, H, W, C)` arrays.

    Raises:
        ValueError: for a spec of another form, listing the allowed ones.
        FileNotFoundError: when the data is not where the spec says.
    """
    kind, path = parse_spec(spec)
    num_classes = None
    if kind == "fashion_mnist":
        (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    elif kind == "npz":
        (x_train, y_train), (x_test, y_test) = from_npz(path)
    elif kind in _CIFAR:
        (x_train, y_train), (x_test, y_test) = load_cifar(kind, path)
        num_classes = _CIFAR[kind][3]
    else:
        from tfkdp.folders import ImageFolder

        folder = ImageFolder(path, image_size, color_mode)
        (x_tr, y_tr), (x_val, y_val) = folder.arrays("train"), folder.arrays("val")
        x_train, y_train = np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val])
        (x_test, y_test), num_classes = folder.arrays("test"), folder.num_classes
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    return (x_train, y_train), (x_test, y_test), num_classes

"""Image-folder datasets streamed from disk with `tf.data`: splits, class names, checked files.

A folder dataset is `ROOT/<class_name>/<image>` (split here by a hash of each
file's path) or `ROOT/{train,val,test}/<class_name>/<image>` (split by the
folders). Only the file names are held in memory; images are read, decoded
and resized batch by batch while a `tf.data` pipeline is iterated.
"""

import hashlib
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfkdp.batching import batch_images

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS", "COLOR_MODES", "SPLITS", "HASH_FRACTIONS"]

# The formats `tf.io.decode_image` reads (compared lower-case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
COLOR_MODES = {"grayscale": 1, "rgb": 3}
SPLITS = ("train", "val", "test")
# A file of a folder without split sub-folders goes to train, val or test by
# where the hash of its relative path falls in [0, 1): these cumulative bounds.
HASH_FRACTIONS = (0.8, 0.9)
# Without val/, the train/ files whose path hash is below this are the validation split.
_VAL_FROM_TRAIN = 0.1
# Shuffle buffer (images) after a cache; without a cache the file names are shuffled, all of them.
_CACHED_SHUFFLE_BUFFER = 4096


def _unit_hash(relative_path):
    """A stable number in [0, 1) for a relative path (the same on every machine and run)."""
    key = relative_path.replace(os.sep, "/").encode("utf-8")
    return int(hashlib.sha256(key).hexdigest()[:16], 16) / float(1 << 64)


def _list_class_folders(directory):
    return sorted(
        name for name in os.listdir(directory)
        if os.path.isdir(os.path.join(directory, name)) and not name.startswith(".")
    )  # fmt: skip


def _list_images(class_dir):
    """Image files under `class_dir` (recursively), and the count of other files skipped."""
    images, skipped = [], 0
    for parent, dirs, names in os.walk(class_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(os.path.join(parent, name))
            else:
                skipped += 1
    return images, skipped


def _decode(contents, channels):
    """Decodes PNG/JPEG/BMP/GIF bytes to uint8 `(H, W, channels)`, converting colour as needed."""
    image = tf.io.decode_image(contents, channels=0, expand_animations=False)
    native = tf.shape(image)[-1]
    if channels == 1:
        image = tf.cond(
            native >= 3,
            lambda: tf.image.rgb_to_grayscale(image[..., :3]),
            lambda: image[..., :1],
        )
    else:
        image = tf.cond(
            native >= 3,
            lambda: image[..., :3],
            lambda: tf.image.grayscale_to_rgb(image[..., :1]),
        )
    return image


class ImageFolder:
    """An image-folder dataset: its files, splits and class names, streamed as `tf.data`.

    Layouts:
      * `ROOT/train/<class>/*`, `ROOT/test/<class>/*` and optionally
        `ROOT/val/<class>/*`: the splits are the folders. Without `val/`, the
        training files whose path hash falls below 0.1 are the validation split.
      * `ROOT/<class>/*`: each file goes to train, val or test by a stable hash
        of its path relative to ROOT (SHA-256, as a number in [0, 1): below 0.8
        train, below 0.9 val, else test), so the split does not depend on the
        order of listing, and adding a file never moves another one.

    Class names are the sorted sub-folder names (of `train/` in the first
    layout; `val/` and `test/` may hold only some of them), and a class's
    index is its position in that list, in every split. Files are matched by
    extension (`IMAGE_EXTENSIONS`, any case; others are skipped and counted).
    Within a split, files are ordered by their path hash, which mixes the
    classes: the first N files of a split are a fair sample of it.

    Args:
        path: the root folder.
        image_size: `(height, width)` images are resized to (bilinear).
        color_mode: `"grayscale"` (1 channel) or `"rgb"` (3 channels); images
            of the other kind are converted.
        check: decode every file once now (`check_images`), so a corrupt image
            is an error naming it before any training rather than mid-epoch.

    Raises:
        FileNotFoundError: if `path` is not a folder.
        ValueError: for a bad `image_size`/`color_mode`, a folder without
            class sub-folders, an empty class folder (naming it), a split with
            no images, a class in `val/`/`test/` that `train/` lacks, or (with
            `check`) a file that does not decode (naming it).

    Example:
        >>> folder = ImageFolder("images/", image_size=(32, 32), color_mode="rgb")  # doctest: +SKIP
        >>> train = folder.dataset("train", batch_size=128, training=True)  # doctest: +SKIP
    """

    def __init__(self, path, image_size=(28, 28), color_mode="grayscale", check=True):
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else None
        if size is None or len(size) != 2 or not all(
            isinstance(d, (int, np.integer)) and d > 0 for d in size
        ):
            raise ValueError(
                f"image_size must be (height, width) with positive integers; received {image_size!r}"
            )
        if color_mode not in COLOR_MODES:
            raise ValueError(
                f"color_mode must be one of {sorted(COLOR_MODES)}; received {color_mode!r}"
            )
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image folder dataset not found: {path!r} is not a directory")
        self.path = path
        self.image_size = (int(size[0]), int(size[1]))
        self.color_mode = color_mode
        self.image_shape = (*self.image_size, COLOR_MODES[color_mode])
        self.skipped = 0
        top = _list_class_folders(path)
        self.layout = "folders" if "train" in top else "hashed"
        if self.layout == "folders" and "test" not in top:
            raise ValueError(
                f"image folder {path!r} has a train/ sub-folder but no test/ one; give it "
                "train/, test/ (and optionally val/), or only class sub-folders to split by hash"
            )
        self._files = self._scan_split_folders() if self.layout == "folders" else self._scan_hashed()
        for split in SPLITS:
            if not self._files[split][0]:
                raise ValueError(
                    f"image folder {path!r} has no images in its {split!r} split "
                    f"({self.describe()}); add images, or give it train/, val/ and test/ "
                    "sub-folders"
                )
        if self.skipped:
            logging.warning(
                "image folder %r: skipped %d files whose extension is not one of %s",
                path, self.skipped, ", ".join(IMAGE_EXTENSIONS),
            )
        if check:
            self.check_images()

    def _classes(self, directory, class_names=None):
        """`[(path, label)]` of the class folders of `directory`, and their images."""
        found = _list_class_folders(directory)
        if not found:
            raise ValueError(
                f"image folder {directory!r} has no class sub-folders; expected "
                f"{directory}/<class_name>/<image> (images {', '.join(IMAGE_EXTENSIONS)})"
            )
        if class_names is None:
            class_names = found
        unknown = [name for name in found if name not in class_names]
        if unknown:
            raise ValueError(
                f"class folders {unknown} in {directory!r} are not in train/ "
                f"({class_names}); every split must use the training classes"
            )
        files = []
        for name in found:
            class_dir = os.path.join(directory, name)
            images, skipped = _list_images(class_dir)
            self.skipped += skipped
            if not images:
                raise ValueError(
                    f"class folder {class_dir!r} holds no images (extensions "
                    f"{', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
                )
            label = class_names.index(name)
            files.extend((image, label) for image in images)
        return class_names, files

    def _ordered(self, files):
        """`[(unit_hash, path, label)]` sorted by the hash of the path relative to the root."""
        return sorted((_unit_hash(os.path.relpath(f, self.path)), f, label) for f, label in files)

    @staticmethod
    def _columns(rows):
        return [path for _, path, _ in rows], [label for _, _, label in rows]

    def _scan_split_folders(self):
        self.class_names, train = self._classes(os.path.join(self.path, "train"))
        rows = {"train": self._ordered(train)}
        for split in ("val", "test"):
            directory = os.path.join(self.path, split)
            if os.path.isdir(directory):
                rows[split] = self._ordered(self._classes(directory, self.class_names)[1])
        if "val" not in rows:
            held = rows["train"]
            rows["train"] = [r for r in held if r[0] >= _VAL_FROM_TRAIN]
            rows["val"] = [r for r in held if r[0] < _VAL_FROM_TRAIN]
        return {split: self._columns(rows[split]) for split in SPLITS}

    def _scan_hashed(self):
        self.class_names, files = self._classes(self.path)
        rows = {split: [] for split in SPLITS}
        for row in self._ordered(files):
            unit = row[0]
            split = "train" if unit < HASH_FRACTIONS[0] else "val" if unit < HASH_FRACTIONS[1] else "test"
            rows[split].append(row)
        return {split: self._columns(rows[split]) for split in SPLITS}

    @property
    def num_classes(self):
        return len(self.class_names)

    def files(self, split):
        """`(paths, labels)` of a split, in the split's (hash) order.

        Raises:
            ValueError: for a split not in `SPLITS`.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; received {split!r}")
        paths, labels = self._files[split]
        return list(paths), list(labels)

    def describe(self):
        counts = ", ".join(f"{s}: {len(self._files.get(s, ((), ()))[0])}" for s in SPLITS)
        return f"layout {self.layout}, {counts} images"

    def check_images(self, batch_size=256):
        """Decodes every listed file once (in parallel, streamed) and fails on the first bad ones.

        Returns:
            The number of files checked.

        Raises:
            ValueError: naming up to 5 files that do not decode as images, and their count.
        """
        paths = [p for split in SPLITS for p in self._files[split][0]]
        channels = self.image_shape[-1]

        def decodes(index, path):
            image = _decode(tf.io.read_file(path), channels)
            return index, tf.shape(image)[0]

        checked = (
            tf.data.Dataset.from_tensor_slices(paths).enumerate()
            .map(decodes, num_parallel_calls=tf.data.AUTOTUNE)
            .ignore_errors()  # a file that fails is missing from the output: found below
            .batch(batch_size)
        )  # fmt: skip
        good = np.zeros(len(paths), bool)
        for index, _ in checked.as_numpy_iterator():
            good[index] = True
        bad = [paths[i] for i in np.flatnonzero(~good)]
        if bad:
            raise ValueError(
                f"{len(bad)} file(s) in image folder {self.path!r} have an image extension but do "
                f"not decode as images: {bad[:5]}{' ...' if len(bad) > 5 else ''}; fix or remove them"
            )
        return len(paths)

    def _images(self, split, limit=None):
        """A `tf.data.Dataset` of `(uint8 image (H, W, C), int32 label)`: paths in, pixels out."""
        paths, labels = self.files(split)
        if limit:
            paths, labels = paths[:limit], labels[:limit]
        return tf.data.Dataset.from_tensor_slices(
            (tf.constant(paths, tf.string), tf.constant(labels, tf.int32))
        )

    def _load(self, path, label):
        image = _decode(tf.io.read_file(path), self.image_shape[-1])
        image = tf.image.resize(image, self.image_size, method="bilinear")
        image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
        image.set_shape(self.image_shape)
        return image, label

    def dataset(
        self, split, batch_size=128, training=False, seed=0, limit=None, cache=None, **augment
    ):
        """A streamed `tf.data` pipeline of a split: list files, decode, resize, batch, prefetch.

        Only the file names are held in memory; shuffling (in training)
        shuffles file names, before any image is read. Augmentation and
        scaling are those of `tfkdp.data.make_dataset` (`tfkdp.batching`).

        Args:
            split: `"train"`, `"val"` or `"test"`.
            batch_size: batch size.
            training: shuffle each epoch and (by default) augment.
            seed: seed of shuffling and augmentation.
            limit: use only the split's first `limit` files (0/None: all).
            cache: `None` (default: decode every epoch), a file path prefix
                (decoded images cached on disk), or `"memory"` (cached in RAM:
                memory then grows with the split's size). With a cache,
                training shuffles decoded images in a buffer of 4096.
            **augment: `augment`, `pad`, `flip`, `mean`, `std`,
                `drop_remainder` and `scaling` (the input scaling,
                `tfkdp.scaling`; default `"unit"`, [0, 1]) of
                `tfkdp.data.make_dataset`.

        Returns:
            A `tf.data.Dataset` of `(float32 images (B, H, W, C), int32 labels (B,))`.
        """
        files = self._images(split, limit)
        if cache is None:
            images = files
            if training:
                images = images.shuffle(len(self.files(split)[0]), seed=seed,
                                        reshuffle_each_iteration=True)  # fmt: skip
            images = images.map(self._load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:
            images = files.map(self._load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            images = images.cache("" if cache == "memory" else str(cache))
            if training:
                # Decoded images in the buffer: bounded, so memory stays flat.
                images = images.shuffle(min(len(self.files(split)[0]), _CACHED_SHUFFLE_BUFFER),
                                        seed=seed, reshuffle_each_iteration=True)  # fmt: skip
        return batch_images(
            images, self.image_shape, batch_size=batch_size, training=training, seed=seed,
            **augment,
        )  # fmt: skip

    def arrays(self, split, limit=None):
        """The split's first `limit` images (all if None) as uint8 `(N, H, W, C)` and int64 labels."""
        xs, ys = [], []
        for x, y in self._images(split, limit).map(self._load).batch(512).as_numpy_iterator():
            xs.append(x)
            ys.append(y.astype(np.int64))
        return np.concatenate(xs), np.concatenate(ys)

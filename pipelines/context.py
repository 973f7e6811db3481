"""What the compress pipeline's stages share: `Context` (flags, data, strategy, folders).

Also the few reads every stage file makes of it: the scaling baked into the
artifacts and the teacher of the finished teacher stage. The stages are in
`workflow` (training) and `deploy` (export, verify, latency).
"""

import os

import numpy as np
from absl import logging

from tfkdp.pipelines import distributed, validate

__all__ = ["Context", "baked", "input_scaling", "load_teacher", "teacher_path"]


class Context:
    """What the stages share: flags, data, strategy, and the runner's folders.

    Array datasets (`fashion_mnist`, `npz:`, `cifar10:`, `cifar100:`) are held in
    memory; a `dir:` folder is streamed from disk (`tfkdp.folders.ImageFolder`:
    only its file names are held), at the teacher file's input size and
    channels, or `--image_size`/`--color_mode` for a zoo teacher.
    """

    def __init__(self, values, runner):
        from tfkdp import data

        self.flags = values
        self.runner = runner
        self.folder = None
        # --input_scaling: checked before any data is read or model trained (lists the valid names).
        self.scaling = input_scaling(values)
        # Before any other TensorFlow work: MultiWorkerMirroredStrategy configures collectives.
        self.strategy = distributed.make_strategy(values["strategy"])
        distributed.log_global_batch(self.strategy, values)
        kind, path = data.parse_spec(values["dataset"])
        if kind == "dir":
            from tfkdp.folders import ImageFolder

            image_size, color_mode = validate.folder_format(values)
            # Lists the splits and decodes every file once: a corrupt image stops here.
            self.folder = ImageFolder(path, image_size, color_mode)
            logging.info("dataset %s: %s, %s", values["dataset"], self.folder.describe(),
                         self.folder.image_shape)  # fmt: skip
            self.num_classes = self.folder.num_classes
            self.input_shape = tuple(self.folder.image_shape)
        else:
            (x_train, y_train), (x_test, y_test), self.num_classes = data.load_dataset(
                values["dataset"]
            )
            (self.x_train, self.y_train), (self.x_val, self.y_val) = data.validation_split(
                x_train, y_train, 0.1, seed=values["seed"]
            )
            self.x_test, self.y_test = x_test, y_test
            self.input_shape = tuple(int(d) for d in x_train.shape[1:])

    def datasets(self, subset=0):
        from tfkdp import data

        batch, seed = self.flags["batch_size"], self.flags["seed"]
        if self.folder is not None:
            train = self.folder.dataset("train", batch, training=True, seed=seed, limit=subset,
                                        scaling=self.scaling)  # fmt: skip
            val = self.folder.dataset("val", 512, scaling=self.scaling)
            return distributed.sharded(self, train), distributed.sharded(self, val)
        x, y = self.x_train, self.y_train
        if subset:
            x, y = x[:subset], y[:subset]
        train = data.make_dataset(x, y, batch, training=True, seed=seed, scaling=self.scaling)
        val = data.make_dataset(self.x_val, self.y_val, 512, scaling=self.scaling)
        return distributed.sharded(self, train), distributed.sharded(self, val)

    def test_inputs(self, limit=None, raw=False):
        """The first `limit` test images (all if None) scaled as for training, and their labels.

        `raw`: the images as float32 pixels in [0, 255] instead (what artifacts
        with a baked `--input_scaling` take).
        """
        from tfkdp import data

        if self.folder is not None:
            x, y = self.folder.arrays("test", limit)
        else:
            x = self.x_test if limit is None else self.x_test[:limit]
            y = self.y_test if limit is None else self.y_test[:limit]
        if raw:
            return data.to_pixels(x), np.asarray(y)
        return data.preprocess(x, scaling=self.scaling).numpy(), np.asarray(y)

    def train_inputs(self, limit, raw=False):
        """The first `limit` training images scaled as for training (e.g. int8 calibration).

        `raw`: float32 pixels in [0, 255] instead (calibration of baked artifacts).

        The training order is random (a seeded permutation for arrays, the path
        hash for folders), so the first images are a random draw of the classes.
        """
        from tfkdp import data

        x = self.folder.arrays("train", limit)[0] if self.folder is not None else self.x_train[:limit]
        return data.to_pixels(x) if raw else data.preprocess(x, scaling=self.scaling).numpy()

    def test_accuracy(self, model):
        """Top-1 accuracy of `model` on the whole test split (streamed for a folder)."""
        from tfkdp import metrics

        if self.folder is None:
            x, y = self.test_inputs()
            return metrics.accuracy(model, x, y, batch_size=512)
        images = self.folder.dataset("test", 512, scaling=self.scaling).map(lambda x, y: x)
        logits = model.predict(images, verbose=0)
        labels = np.asarray(self.folder.files("test")[1])
        return float(np.mean(np.argmax(logits, axis=-1) == labels))

    def path(self, stage, name):
        return os.path.join(self.runner.stage_dir(stage), name)


def input_scaling(values):
    """The `--input_scaling` name, checked (`ValueError` listing the valid names); default `unit`."""
    from tfkdp import scaling

    return scaling.get(values.get("input_scaling", scaling.DEFAULT)).name


def baked(ctx):
    """The scaling baked into the exported artifacts (`--bake_preprocessing`), or None."""
    return ctx.scaling if ctx.flags.get("bake_preprocessing", False) else None


def teacher_path(ctx):
    record = ctx.runner.record("teacher")["summary"]
    return ctx.path("teacher", "teacher.keras") if record["trained_here"] else record["path"]


def load_teacher(ctx):
    """The teacher model of the finished teacher stage (or the user's file)."""
    from tfkdp.distill.distiller import load_teacher as load

    return load(teacher_path(ctx), input_shape=ctx.input_shape)

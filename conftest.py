"""Doctest namespace: the names the library's `Example:` blocks use, on tiny models and data."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace, tmp_path):
    if not isinstance(request.node, pytest.DoctestItem):
        return
    import keras
    import tensorflow as tf

    import tfkdp
    from tfkdp import data, models

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 12, 12, 1)).astype("float32")
    y = (np.arange(32) % 3).astype("int64")

    def small(width, name):
        return models.resnet_cifar(8, width=width, input_shape=(12, 12, 1), num_classes=3, name=name)

    doctest_namespace.update(
        np=np, keras=keras, tf=tf, tfkdp=tfkdp, x=x, y=y, tmp=str(tmp_path),
        teacher=small(8, "teacher"), student=small(8, "student"), model=small(8, "model"),
        train_ds=data.make_dataset(x, y, batch_size=16, training=False),
        val_ds=data.make_dataset(x[:16], y[:16], batch_size=16, training=False),
    )  # fmt: skip

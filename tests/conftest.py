"""Shared test setup.

Two logical CPU devices are configured before TensorFlow initialises its
runtime so that `tf.distribute.MirroredStrategy` tests can run on any CPU
machine (this must happen before the first op, hence here and not in a test).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# pytest -n 2 runs two workers on this project's 2-core machines: one intra-op thread per
# worker avoids oversubscription (measured: 108 s -> 96 s on the ddsl+unstructured tests).
# Inter-op threads stay at TF's default (blocking cross-device ops need more than one).
tf.config.threading.set_intra_op_parallelism_threads(1)

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same seeds (numpy, Python, TF, Keras)."""
    keras.utils.set_random_seed(1234)
    yield
    # Without Keras' gc.collect(): a full collection of the session's heap after every test
    # took 1-3 s and a third of the suite's time (946 of 2626 worker-seconds measured);
    # Python's generational collector still runs as usual.
    keras.backend.clear_session(free_memory=False)


@pytest.fixture
def tiny_images():
    """64 structured 12×12×1 images in 3 classes (class = which third is bright)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.2, size=(64, 12, 12, 1)).astype("float32")
    y = np.arange(64) % 3
    for i, label in enumerate(y):
        x[i, :, label * 4 : label * 4 + 4, 0] += 0.8
    return x, y.astype("int32")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """An untrained resnet8 teacher file for `test_pipeline._values`'s data (12×12×1, 3 classes).

    The recipes' pipeline tests check wiring, records and reports, not accuracy:
    a given teacher file skips the teacher stage's training.
    """
    from tfkdp import models

    keras.utils.set_random_seed(0)
    model = models.get("resnet8", input_shape=(12, 12, 1), num_classes=3)
    path = tmp_path_factory.mktemp("teacher") / "resnet8.keras"
    model.save(path)
    return str(path)

"""Batching of image datasets: input scaling, augmentation, batches, prefetch.

Shared by the in-memory datasets (`tfkdp.data.make_dataset`) and the image
folders streamed from disk (`tfkdp.folders.ImageFolder.dataset`), so both
train on identically prepared batches.
"""

import numpy as np
import tensorflow as tf

from tfkdp import scaling as scaling_lib

__all__ = ["preprocess", "batch_images", "to_pixels"]


def preprocess(x, mean=None, std=None, scaling=scaling_lib.DEFAULT):
    """Scales images to float32 model inputs with an input scaling, then standardises them.

    uint8 images are pixel values in [0, 255] and go through `scaling`
    (`tfkdp.scaling`: `"unit"` [0, 1], `"raw"` 0–255, `"symmetric"` [−1, 1],
    `"caffe"`, `"torch"`). Float images are taken to be already in [0, 1]
    (pixels / 255, tfkdp's convention): `"unit"` passes them unchanged and
    the other scalings map them as they map `x · 255`. Adds a channel axis to
    rank-3 input. `mean`/`std` (scalars or per channel) then standardise;
    `None` leaves the scaled values. Works on numpy arrays and tensors; used
    by `make_dataset`, the streamed folders and the exporters' calibration.

    Args:
        x: images `(N, H, W)` or `(N, H, W, C)`.
        mean, std: optional standardisation after scaling.
        scaling: a name from `tfkdp.scaling.names()` or an `InputScaling`.

    Returns:
        A float32 tensor of the images' shape (channel axis added to rank 3).

    Raises:
        ValueError: for an unknown scaling (listing the valid ones) or a
            channel count a per-channel scaling cannot handle.

    Reference: the scalings of `keras.applications.imagenet_utils.preprocess_input`.

    Example:
        >>> import numpy as np
        >>> float(preprocess(np.full((1, 2, 2), 255, "uint8"), scaling="symmetric")[0, 0, 0, 0])
        1.0
    """
    scale = scaling_lib.get(scaling)
    x = tf.convert_to_tensor(x)
    if x.shape.rank == 3:
        x = x[..., None]
    x = scale(x) if x.dtype == tf.uint8 else scale.from_unit(x)
    if mean is not None:
        x = x - tf.constant(mean, tf.float32)
    if std is not None:
        x = x / tf.constant(std, tf.float32)
    return x


def to_pixels(x):
    """Images as float32 pixel values in [0, 255] with a channel axis: the input of a baked scaling.

    uint8 images are cast; float images are taken to be in [0, 1] (tfkdp's
    convention, see `preprocess`) and multiplied by 255.

    Args:
        x: images `(N, H, W)` or `(N, H, W, C)`, numpy or tensor.

    Returns:
        A float32 numpy array `(N, H, W, C)`.

    Example:
        >>> import numpy as np
        >>> to_pixels(np.full((1, 2, 2), 7, "uint8")).shape
        (1, 2, 2, 1)
    """
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32)
    return (x.astype(np.float32) * 255.0).astype(np.float32)


def batch_images(
    dataset,
    image_shape,
    batch_size=128,
    training=False,
    augment=None,
    pad=2,
    flip=True,
    mean=None,
    std=None,
    seed=0,
    drop_remainder=False,
    scaling=scaling_lib.DEFAULT,
):
    """Augments, batches, scales and prefetches a dataset of `(image, label)` pairs.

    The second half of `tfkdp.data.make_dataset`, shared with the streamed image
    folders (`tfkdp.folders.ImageFolder.dataset`): shuffling is the caller's.

    Args:
        dataset: a `tf.data.Dataset` of `(image (H, W, C), int32 label)`.
        image_shape: `(H, W, C)` of one image.
        scaling: the input scaling of the images (`tfkdp.scaling`), applied
            per batch after augmentation.
        Others: as in `tfkdp.data.make_dataset`.

    Returns:
        A `tf.data.Dataset` of `(images float32 (B, H, W, C), labels int32 (B,))`.

    Raises:
        ValueError: if `batch_size` < 1, `pad` < 0, or `scaling` is unknown
            (listing the valid names) or cannot scale `C` channels.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; received batch_size={batch_size!r}")
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0; received pad={pad!r}")
    augment = training if augment is None else augment
    height, width, channels = (int(d) for d in image_shape)
    scaling = scaling_lib.get(scaling)
    if isinstance(scaling, scaling_lib.AffineScaling):
        scaling.constants(channels)  # a channel count it cannot scale fails here, not mid-epoch
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
        lambda images, labels: (preprocess(images, mean, std, scaling), labels),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )

    return dataset.prefetch(tf.data.AUTOTUNE)

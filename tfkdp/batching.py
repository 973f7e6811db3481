"""Batching of image datasets: scaling to [0, 1], augmentation, batches, prefetch.

Shared by the in-memory datasets (`tfkdp.data.make_dataset`) and the image
folders streamed from disk (`tfkdp.folders.ImageFolder.dataset`), so both
train on identically prepared batches.
"""

import tensorflow as tf

__all__ = ["preprocess", "batch_images"]


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
):
    """Augments, batches, scales and prefetches a dataset of `(image, label)` pairs.

    The second half of `tfkdp.data.make_dataset`, shared with the streamed image
    folders (`tfkdp.folders.ImageFolder.dataset`): shuffling is the caller's.

    Args:
        dataset: a `tf.data.Dataset` of `(image (H, W, C), int32 label)`.
        image_shape: `(H, W, C)` of one image.
        Others: as in `tfkdp.data.make_dataset`.

    Returns:
        A `tf.data.Dataset` of `(images float32 (B, H, W, C), labels int32 (B,))`.

    Raises:
        ValueError: if `batch_size` < 1 or `pad` < 0.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; received batch_size={batch_size!r}")
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0; received pad={pad!r}")
    augment = training if augment is None else augment
    height, width, channels = (int(d) for d in image_shape)
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

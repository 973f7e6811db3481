"""Image folders streamed from disk (`tfkdp.folders`), CIFAR pickles, and `dir:` in the pipeline.

Every dataset here is generated in a temporary folder: tiny PNG images and
pickles in the exact format of the CIFAR downloads (never the network).
"""

import json
import os
import pickle

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfkdp import data, folders
from tfkdp.pipelines import workflow


def _save(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keras.utils.save_img(path, image, scale=False)


def _class_folders(root, classes=("cat", "dog", "eel"), per_class=20, shape=(17, 23, 3), seed=0):
    """`root/<class>/<i>.png`: class c's images have a constant value 80·c plus small noise."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        for i in range(per_class):
            image = 80 * label + rng.integers(0, 10, size=shape)
            _save(os.path.join(root, name, f"{i:03d}.png"), image.astype("uint8"))
    return str(root)


def _all_files(folder):
    return {split: folder.files(split)[0] for split in folders.SPLITS}


def test_hashed_split_is_deterministic_disjoint_and_resizes_odd_rgb_images(tmp_path):
    root = _class_folders(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "README.txt").write_text("not an image")
    (tmp_path / "imgs" / "dog" / "labels.csv").write_text("1,2")
    first = folders.ImageFolder(root, image_size=(12, 12), color_mode="rgb")
    second = folders.ImageFolder(root, image_size=(12, 12), color_mode="rgb")
    assert first.layout == "hashed"
    assert first.class_names == ["cat", "dog", "eel"]
    assert first.skipped == 2  # the .txt and .csv files: counted, not read
    splits = _all_files(first)
    # the same files in each split on a second listing
    assert splits == _all_files(second)
    names = [set(paths) for paths in splits.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert sum(len(n) for n in names) == 60 and all(names)
    # a file's split depends only on its relative path: the documented hash rule
    for split, paths in splits.items():
        for path in paths:
            unit = folders._unit_hash(os.path.relpath(path, root))
            expected = "train" if unit < 0.8 else "val" if unit < 0.9 else "test"
            assert split == expected
    x, y = first.arrays("test")
    assert x.shape == (len(splits["test"]), 12, 12, 3) and x.dtype == np.uint8
    # the constant class value survives the 17x23 -> 12x12 bilinear resize (noise < 10)
    np.testing.assert_array_less(np.abs(x.astype(int) - 80 * y[:, None, None, None]), 10)


def test_split_folders_with_grayscale_conversion_and_val_from_train(tmp_path):
    root = tmp_path / "imgs"
    _class_folders(root / "train", per_class=30, shape=(9, 9, 3))
    _class_folders(root / "test", classes=("cat", "dog"), per_class=2, shape=(9, 9, 3), seed=1)
    folder = folders.ImageFolder(str(root), image_size=(9, 9), color_mode="grayscale")
    assert folder.layout == "folders" and folder.class_names == ["cat", "dog", "eel"]
    train, val, test = (folder.files(s) for s in folders.SPLITS)
    # without val/, the training files whose path hash is below 0.1 are the validation split
    assert len(train[0]) + len(val[0]) == 90 and val[0]
    assert all(p.startswith(str(root / "train")) for p in train[0] + val[0])
    assert sorted(test[1]) == [0, 0, 1, 1]  # test/ holds two of the classes: labels as in train/
    x, y = folder.arrays("test")
    assert x.shape == (4, 9, 9, 1)  # RGB files converted to one channel
    np.testing.assert_array_less(np.abs(x.astype(int) - 80 * y[:, None, None, None]), 11)

    # with val/ present it is used as it is
    _class_folders(root / "val", per_class=1, shape=(9, 9, 3), seed=2)
    folder = folders.ImageFolder(str(root), image_size=(9, 9))
    assert len(folder.files("val")[0]) == 3 and len(folder.files("train")[0]) == 90


def test_grayscale_files_become_rgb_for_an_rgb_teacher(tmp_path):
    root = _class_folders(tmp_path / "imgs", classes=("a", "b"), shape=(8, 8, 1))
    folder = folders.ImageFolder(root, image_size=(8, 8), color_mode="rgb")
    x, y = folder.arrays("train")
    assert x.shape[1:] == (8, 8, 3)
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey replicated into three channels


def test_corrupt_png_is_an_error_naming_the_file_before_training(tmp_path):
    root = _class_folders(tmp_path / "imgs", classes=("a", "b"), shape=(8, 8, 1))
    bad = tmp_path / "imgs" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    with pytest.raises(ValueError, match="broken.png") as info:
        folders.ImageFolder(root, image_size=(8, 8))
    assert "1 file(s)" in str(info.value) and "do not decode" in str(info.value)
    # without the preflight the listing works: the check is what finds it
    assert folders.ImageFolder(root, image_size=(8, 8), check=False).num_classes == 2


def test_empty_class_folder_is_a_value_error_naming_it(tmp_path):
    root = _class_folders(tmp_path / "imgs", classes=("a", "b"), shape=(8, 8, 1))
    (tmp_path / "imgs" / "empty").mkdir()
    (tmp_path / "imgs" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder .*empty.* holds no images"):
        folders.ImageFolder(root, image_size=(8, 8))


@pytest.mark.parametrize(
    "case, error, needle",
    [
        ("missing", FileNotFoundError, "not a directory"),
        ("no_classes", ValueError, "no class sub-folders"),
        ("train_without_test", ValueError, "no test/"),
        ("unknown_test_class", ValueError, "not in train/"),
        ("bad_size", ValueError, "image_size"),
        ("bad_mode", ValueError, "color_mode"),
    ],
)
def test_bad_folders_and_arguments_are_clear_errors(tmp_path, case, error, needle):
    root = tmp_path / "imgs"
    kwargs = {"image_size": (8, 8)}
    if case == "no_classes":
        root.mkdir()
        _save(str(root / "loose.png"), np.zeros((8, 8, 1), "uint8"))
    elif case in ("train_without_test", "unknown_test_class"):
        _class_folders(root / "train", classes=("a",), per_class=2, shape=(8, 8, 1))
        if case == "unknown_test_class":
            _class_folders(root / "test", classes=("zebra",), per_class=1, shape=(8, 8, 1))
    elif case != "missing":
        _class_folders(root, classes=("a",), per_class=2, shape=(8, 8, 1))
        kwargs = {"image_size": (8, 0)} if case == "bad_size" else {"color_mode": "rgba"}
    with pytest.raises(error, match=needle):
        folders.ImageFolder(str(root), **kwargs)


def test_streamed_dataset_is_a_pipeline_of_file_names_read_while_iterating(tmp_path):
    root = tmp_path / "imgs"
    for split, count in (("train", 4), ("val", 1), ("test", 1)):
        for i in range(count):
            _save(str(root / split / "a" / f"{i}.png"), np.full((5, 7, 1), 10, "uint8"))
    folder = folders.ImageFolder(str(root), image_size=(5, 7))
    test = folder.dataset("test", batch_size=1)
    assert test.element_spec == (
        tf.TensorSpec((None, 5, 7, 1), tf.float32), tf.TensorSpec((None,), tf.int32)
    )
    # Built from the file name alone: a file rewritten after building is read as it is now.
    (path,) = folder.files("test")[0]
    _save(path, np.full((5, 7, 1), 200, "uint8"))
    (images, labels), = list(test)
    np.testing.assert_allclose(images.numpy(), 200 / 255.0, rtol=1e-6)
    train = folder.dataset("train", batch_size=2, training=True, seed=3)
    assert [tuple(b[0].shape) for b in train] == [(2, 5, 7, 1), (2, 5, 7, 1)]
    # the same seed replays the same shuffled epoch (shuffling is over file names)
    again = folder.dataset("train", batch_size=4, training=True, seed=3, augment=False)
    np.testing.assert_array_equal(next(iter(again))[1], next(iter(again))[1])


@pytest.mark.parametrize("name", ["caffe", "torch"])
def test_streamed_batches_use_the_input_scaling_grayscale_with_the_mean_constants(tmp_path, name):
    root = _class_folders(tmp_path / "imgs", classes=("a", "b"), shape=(6, 6, 1))
    for color_mode, channels in (("rgb", 3), ("grayscale", 1)):
        folder = folders.ImageFolder(root, image_size=(6, 6), color_mode=color_mode, check=False)
        x, _ = folder.arrays("test")
        (images, _), = list(folder.dataset("test", batch_size=len(x), scaling=name))
        expected = data.preprocess(x, scaling=name).numpy()
        assert images.shape[-1] == channels
        np.testing.assert_allclose(images.numpy(), expected, rtol=1e-6, atol=1e-5)
    # grayscale: the mean of the three ImageNet channel constants (README, Data)
    if name == "caffe":
        np.testing.assert_allclose(expected, x - np.mean([103.939, 116.779, 123.68]), atol=1e-4)


def test_dir_dataset_takes_a_keras_teachers_input_shape(tmp_path):
    from tfkdp import models

    root = _class_folders(tmp_path / "imgs", shape=(17, 23, 1))  # grayscale files
    teacher = models.get("resnet8", input_shape=(16, 16, 3), num_classes=3)
    path = str(tmp_path / "teacher.keras")
    teacher.save(path)
    values = {"teacher": path, "dataset": f"dir:{root}", "image_size": ["28", "28"],
              "color_mode": "grayscale", "seed": 0, "batch_size": 8, "strategy": "default"}  # fmt: skip
    ctx = workflow.Context(values, runner=None)
    assert ctx.input_shape == (16, 16, 3) and ctx.num_classes == 3
    train, val = ctx.datasets()
    assert tuple(next(iter(train))[0].shape[1:]) == (16, 16, 3)
    x, y = ctx.test_inputs(2)
    assert x.shape == (2, 16, 16, 3) and x.dtype == np.float32 and 0.0 <= x.min() <= x.max() <= 1.0
    assert ctx.train_inputs(5).shape == (5, 16, 16, 3)
    # a zoo teacher trained here takes --image_size and --color_mode
    ctx = workflow.Context(dict(values, teacher="resnet8", image_size=["10", "14"],
                                color_mode="rgb"), runner=None)  # fmt: skip
    assert ctx.input_shape == (10, 14, 3)


def _cifar_pickle(path, n, label_key, num_classes, seed):
    """One batch file exactly as the CIFAR python downloads are: a pickled dict of bytes keys."""
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"generated batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v // 5 for v in batch[label_key]]
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def _cifar10_folder(parent):
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    batches = [_cifar_pickle(root / f"data_batch_{i}", 4, b"labels", 10, i) for i in range(1, 6)]
    test = _cifar_pickle(root / "test_batch", 3, b"labels", 10, 9)
    return root, batches, test


def test_cifar10_pickles_load_as_32x32x3_images(tmp_path):
    root, batches, test = _cifar10_folder(tmp_path)
    for path in (str(root), str(tmp_path)):  # the folder itself, or where it was unpacked
        (x_train, y_train), (x_test, y_test) = data.load_cifar("cifar10", path)
        assert x_train.shape == (20, 32, 32, 3) and x_test.shape == (3, 32, 32, 3)
        assert x_train.dtype == np.uint8
    assert y_train.tolist() == sum((b[b"labels"] for b in batches), [])
    # a row is 1024 red, 1024 green, then 1024 blue values, each plane row-major
    row = batches[0][b"data"][1]
    assert x_train[1, 0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert x_train[1, 2, 5, 1] == row[1024 + 2 * 32 + 5]
    np.testing.assert_array_equal(y_test, test[b"labels"])
    (a, _), (_, d), classes = data.load_dataset(f"cifar10:{root}")
    assert a.shape == (20, 32, 32, 3) and classes == 10 and len(d) == 3


def test_cifar100_uses_fine_labels_and_missing_files_are_named(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train = _cifar_pickle(root / "train", 6, b"fine_labels", 100, 0)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/test"):
        data.load_cifar("cifar100", str(tmp_path))
    _cifar_pickle(root / "test", 2, b"fine_labels", 100, 1)
    (x, y), (xt, _), classes = data.load_dataset(f"cifar100:{tmp_path}")
    assert x.shape == (6, 32, 32, 3) and xt.shape == (2, 32, 32, 3) and classes == 100
    assert y.tolist() == train[b"fine_labels"]

    cifar10, _, _ = _cifar10_folder(tmp_path / "c10")
    os.remove(cifar10 / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar("cifar10", str(cifar10))
    with pytest.raises(ValueError, match="cifar10"):
        data.load_dataset("cifar:somewhere")


def test_cifar_loader_refuses_pickles_that_would_run_code(tmp_path):
    root, _, _ = _cifar10_folder(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="not allowed"):
        data.load_cifar("cifar10", str(root))


def test_pipeline_runs_on_an_rgb_image_folder_of_odd_sizes(tmp_path):
    from test_pipeline import _values  # tests/ is on sys.path (rootdir-relative, no package)

    from tfkdp import models

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for label, name in enumerate(("a", "b", "c")):
        for i in range(24):
            image = rng.integers(0, 60, size=(17, 23, 3))
            image[:, label * 7 : label * 7 + 7, label] += 180  # class: a bright band of one colour
            _save(str(root / name / f"{i}.png"), image.astype("uint8"))
    keras.utils.set_random_seed(0)
    teacher = tmp_path / "teacher.keras"
    models.get("resnet8", input_shape=(12, 12, 3), num_classes=3).save(teacher)
    values = _values(tmp_path, teacher=str(teacher), dataset=f"dir:{root}", formats=["tflite"],
                     compress_epochs=1, finetune_epochs=0)  # fmt: skip
    workflow.run(values)
    with open(os.path.join(values["output_dir"], "report.json")) as f:
        report = json.load(f)
    assert report["student"]["macs"] < report["teacher"]["macs"]
    (artifact,) = [a for a in report["artifacts"] if a["format"] == "tflite"]
    assert artifact["top1_agreement"] == 1.0 and artifact["max_abs_diff"] < 1e-3
    student = keras.saving.load_model(os.path.join(values["output_dir"], "strip", "student.keras"))
    assert tuple(student.input_shape[1:]) == (12, 12, 3)

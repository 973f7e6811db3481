import gzip
import os
import struct

import numpy as np
import pytest

from tfkdp import data


def _write_idx(path, array, magic):
    header = struct.pack(">II", magic, array.shape[0])
    if array.ndim == 3:
        header += struct.pack(">II", array.shape[1], array.shape[2])
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_dir(tmp_path, monkeypatch):
    """A directory of valid idx files with the real counts (tiny 2×2 images)."""
    rng = np.random.default_rng(0)
    counts = {"train": 60000, "t10k": 10000}
    for prefix, count in counts.items():
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                   rng.integers(0, 256, (count, 2, 2)), 2051)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10, 2049)
    monkeypatch.setenv("TFKDP_DATA_DIR", str(tmp_path))
    return tmp_path


def test_load_fashion_mnist_prefers_env_dir_and_validates(fake_fashion_dir):
    (x, y), (u, v) = data.load_fashion_mnist(download=False)
    assert x.shape == (60000, 2, 2) and u.shape == (10000, 2, 2)
    assert y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_truncated_file_is_an_error_naming_the_file(fake_fashion_dir):
    path = fake_fashion_dir / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*truncated"):
        data.load_fashion_mnist(download=False)


def test_wrong_magic_number_is_an_error(fake_fashion_dir):
    _write_idx(fake_fashion_dir / "train-labels-idx1-ubyte.gz", np.zeros((60000, 1, 1)), 2051)
    with pytest.raises(ValueError, match="magic number 2051; expected 2049"):
        data.load_fashion_mnist(download=False)


def test_label_out_of_range_is_an_error(fake_fashion_dir):
    _write_idx(fake_fashion_dir / "t10k-labels-idx1-ubyte.gz", np.full(10000, 11), 2049)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        data.load_fashion_mnist(download=False)


def test_missing_everywhere_lists_places_and_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("TFKDP_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(data, "DEBIAN_DIR", str(tmp_path / "debian"))
    with pytest.raises(FileNotFoundError) as info:
        data.load_fashion_mnist(download=False)
    message = str(info.value)
    assert str(tmp_path / "nothing") in message and str(tmp_path / "keras") in message
    assert "apt-get install dataset-fashion-mnist" in message and "load_data" in message


def test_real_fashion_mnist_when_installed():
    if not os.path.exists(os.path.join(data.DEBIAN_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip("Debian's dataset-fashion-mnist is not installed on this machine")
    (x, y), (u, v) = data.load_fashion_mnist(download=False)
    assert x.shape == (60000, 28, 28) and u.shape == (10000, 28, 28)
    assert np.bincount(y).tolist() == [6000] * 10


def test_from_npz_round_trip_and_validation(tmp_path):
    path = tmp_path / "d.npz"
    x = np.zeros((5, 4, 4), "uint8")
    np.savez(path, x_train=x, y_train=np.arange(5), x_test=x[:2], y_test=np.arange(2))
    (a, b), (c, d) = data.from_npz(str(path))
    assert a.shape == (5, 4, 4) and d.tolist() == [0, 1]
    np.savez(path, x_train=x, y_train=np.arange(4), x_test=x[:2], y_test=np.arange(2))
    with pytest.raises(ValueError, match="x_train has 5 items but y_train has 4"):
        data.from_npz(str(path))
    np.savez(path, x_train=x, y_train=np.zeros(5, "float32"), x_test=x[:2], y_test=np.arange(2))
    with pytest.raises(ValueError, match="integer class labels"):
        data.from_npz(str(path))
    np.savez(path, x_train=x)
    with pytest.raises(ValueError, match="lacks keys"):
        data.from_npz(str(path))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        data.from_npz(str(tmp_path / "missing.npz"))


def test_from_directory_reads_class_folders(tmp_path):
    import keras

    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            image = np.full((6, 6, 1), 40 * label + i, "uint8")
            keras.utils.save_img(tmp_path / name / f"{i}.png", image, scale=False)
    x, y, classes = data.from_directory(str(tmp_path), image_size=(6, 6))
    assert classes == ["cat", "dog"]
    assert x.shape == (6, 6, 6, 1) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert sorted(int(v) for v in x[:, 0, 0, 0]) == [0, 1, 2, 40, 41, 42]
    with pytest.raises(FileNotFoundError):
        data.from_directory(str(tmp_path / "none"))


def test_make_dataset_scales_batches_and_is_deterministic():
    x = np.arange(10 * 4 * 4, dtype="uint8").reshape(10, 4, 4) % 255
    y = np.arange(10)
    plain = list(data.make_dataset(x, y, batch_size=4))
    assert [tuple(b[0].shape) for b in plain] == [(4, 4, 4, 1), (4, 4, 4, 1), (2, 4, 4, 1)]
    np.testing.assert_allclose(plain[0][0].numpy()[..., 0], x[:4] / 255.0, rtol=1e-6)

    def epoch(seed):
        ds = data.make_dataset(x, y, batch_size=10, training=True, pad=1, seed=seed)
        return next(iter(ds))

    a, b, c = epoch(3), epoch(3), epoch(4)
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[1].numpy(), c[1].numpy()) or not np.array_equal(
        a[0].numpy(), c[0].numpy()
    )
    # augmentation moves pixels but keeps labels paired with their images' content
    assert sorted(a[1].numpy().tolist()) == list(range(10))


def test_make_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="differ in length"):
        data.make_dataset(np.zeros((3, 2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="batch_size"):
        data.make_dataset(np.zeros((3, 2, 2)), np.zeros(3), batch_size=0)


def test_validation_split_is_disjoint_and_deterministic():
    x, y = np.arange(100), np.arange(100)
    (xt, yt), (xv, yv) = data.validation_split(x, y, 0.2, seed=1)
    assert len(xv) == 20 and len(xt) == 80
    assert set(xt.tolist()).isdisjoint(xv.tolist())
    assert data.validation_split(x, y, 0.2, seed=1)[1][0].tolist() == xv.tolist()
    with pytest.raises(ValueError, match="fraction"):
        data.validation_split(x, y, 1.5)


def test_load_dataset_specs(tmp_path):
    path = tmp_path / "d.npz"
    x = np.zeros((6, 4, 4), "uint8")
    np.savez(path, x_train=x, y_train=np.arange(6) % 4, x_test=x[:2], y_test=np.arange(2))
    (a, b), (c, d), classes = data.load_dataset(f"npz:{path}")
    assert a.shape == (6, 4, 4, 1) and classes == 4
    for bad in ("mnist", "npz:", "", "csv:x"):
        with pytest.raises(ValueError, match="fashion_mnist"):
            data.load_dataset(bad)

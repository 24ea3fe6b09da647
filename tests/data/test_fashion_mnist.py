"""Fashion-MNIST's IDX reader, on small IDX files written here (the real files are tested where present)."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from metaformer.data import fashion_mnist as fm
from metaformer.errors import DataError


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """The IDX format: 0, 0, type 0x08 (unsigned byte), ndim; big-endian sizes; the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    data += array.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_fashion_mnist(root: Path, train: int = 30, test: int = 20, gz: bool = True, seed: int = 0) -> Path:
    """A folder holding the four files with random images and every class present."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_reads_the_four_files_gzipped_or_not(tmp_path, gz):
    root = make_fashion_mnist(tmp_path / "fm", gz=gz)
    train, test = fm.fashion_mnist_splits(
        f"fashion-mnist:{root}", val_transform=lambda im: torch.tensor(im.size)
    )
    assert (len(train), len(test)) == (30, 20)
    assert train.classes == list(fm.CLASSES) and len(fm.CLASSES) == 10
    image, label = train[3]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 3
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], train.images[3]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    assert test[0][0].tolist() == [28, 28]  # the transform is applied


def test_a_torchvision_download_root_works(tmp_path):
    make_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    assert fm.fashion_mnist_dir(f"fashion-mnist:{tmp_path}") == tmp_path / "FashionMNIST" / "raw"


def test_spec_parsing():
    assert fm.is_fashion_mnist("fashion-mnist") and fm.is_fashion_mnist("fashion-mnist:/x")
    assert not fm.is_fashion_mnist("fashion-mnist-folder") and not fm.is_fashion_mnist(None)
    with pytest.raises(DataError, match="names no folder"):
        fm.fashion_mnist_dir("fashion-mnist:")


def test_absent_default_names_the_package_and_the_folder_option(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_DIR", tmp_path / "nowhere")
    with pytest.raises(DataError) as caught:
        fm.fashion_mnist_dir("fashion-mnist")
    message = str(caught.value)
    assert "is not installed in" in message and "dataset-fashion-mnist" in message
    assert "--data fashion-mnist:DIR" in message and "\n" not in message


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="folder '.*nope' does not exist; install the Debian package"):
        fm.fashion_mnist_dir(f"fashion-mnist:{tmp_path / 'nope'}")
    root = make_fashion_mnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing from .*\(t10k-labels-idx1-ubyte not found\)"):
        fm.fashion_mnist_dir(f"fashion-mnist:{root}")


def _broken(tmp_path: Path, name: str, data: bytes) -> Path:
    root = make_fashion_mnist(tmp_path / "fm", gz=False)
    (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("train-images-idx3-ubyte", b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(5),
         r"not an IDX file of 3-D unsigned bytes \(magic 0x00000803, found 0x00000801\)"),
        ("train-labels-idx1-ubyte", b"\x00\x00", "found a file shorter than 4 bytes"),
        ("train-images-idx3-ubyte", b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (30, 28, 28))
         + bytes(100), r"holds 100 data bytes but its header announces shape \(30, 28, 28\).*truncated"),
        ("train-images-idx3-ubyte", b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 32, 32))
         + bytes(2048), r"shape \(2, 32, 32\) but Fashion-MNIST's are 28x28"),
        ("train-labels-idx1-ubyte", b"\x00\x00\x08\x01" + (29).to_bytes(4, "big") + bytes(29),
         "holds 29 labels but its images file holds 30 images"),
        ("train-labels-idx1-ubyte", b"\x00\x00\x08\x01" + (30).to_bytes(4, "big") + bytes([12] * 30),
         "holds label 12 but Fashion-MNIST has 10 classes"),
        ("train-labels-idx1-ubyte", b"\x1f\x8b\x08\x00garbage", "cannot read .*re-download"),
    ],
)  # fmt: skip
def test_corrupt_files_fail_in_one_sentence(tmp_path, name, data, message):
    root = _broken(tmp_path, name, data)
    with pytest.raises(DataError, match=message) as caught:
        fm.fashion_mnist_splits(f"fashion-mnist:{root}")
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(not fm.DEFAULT_DIR.is_dir(), reason="the dataset-fashion-mnist package is not installed")
def test_the_installed_files_are_the_real_set():
    root = fm.fashion_mnist_dir()
    images, labels = fm.load_split(root, "test")
    assert images.shape == (10_000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    train_labels = fm.load_split(root, "train")[1]
    assert np.bincount(train_labels).tolist() == [6000] * 10

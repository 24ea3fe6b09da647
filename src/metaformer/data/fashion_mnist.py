"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, MIT licence) read from its four IDX files.

70,000 real 28x28 grey photographs of clothing in 10 classes: 60,000 for training and 10,000 for
testing, the files torchvision's ``FashionMNIST`` reads (``train-images-idx3-ubyte`` and so on, gzipped
or not). ``--data fashion-mnist`` reads them from ``/usr/share/datasets/fashion-mnist``, where the Debian
package ``dataset-fashion-mnist`` installs them; ``--data fashion-mnist:DIR`` reads any folder holding
them (a torchvision download's ``FashionMNIST/raw`` works too). The files are parsed with numpy, never
unpickled, and checked (magic number, counts, image size, label range) before any training starts. The
test images are the validation split, as for published Fashion-MNIST results.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metaformer.data.embedded import ImageArrayDataset
from metaformer.errors import DataError

SCHEME = "fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SIZE = 28
SPLITS = {  # split -> (file prefix, number of images)
    "train": ("train", 60_000),
    "test": ("t10k", 10_000),
}
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"
HINT = (
    f"install the Debian package {DEBIAN_PACKAGE} (it puts them in {DEFAULT_DIR}) or pass "
    f"--data {SCHEME}:DIR with a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (gzipped or not)"
)


def is_fashion_mnist(data: str | os.PathLike | None) -> bool:
    """Whether a ``--data`` value names Fashion-MNIST (``fashion-mnist`` or ``fashion-mnist:DIR``)."""
    text = str(data) if data is not None else ""
    return text == SCHEME or text.startswith(SCHEME + ":")


def fashion_mnist_dir(data: str | os.PathLike = SCHEME) -> Path:
    """The folder a ``fashion-mnist[:DIR]`` value points at, checked to hold all four files."""
    text = str(data)
    if not is_fashion_mnist(text):
        raise DataError(f"'{text}' does not name Fashion-MNIST; pass {SCHEME} or {SCHEME}:DIR")
    given = text[len(SCHEME) + 1 :]
    if text.startswith(SCHEME + ":") and not given:
        raise DataError(f"'{text}' names no folder; {HINT}")
    root = Path(given).expanduser() if given else DEFAULT_DIR
    if given and not root.is_dir():
        raise DataError(f"Fashion-MNIST folder '{root}' does not exist; {HINT}")
    if given and (root / "FashionMNIST" / "raw").is_dir():  # a torchvision download's root
        root = root / "FashionMNIST" / "raw"
    missing = [name for name in _file_names() if _find(root, name) is None]
    if missing:
        where = "is not installed in" if not given else "is missing from"
        raise DataError(f"Fashion-MNIST {where} '{root}' ({missing[0]} not found); {HINT}")
    return root


def _file_names() -> list[str]:
    kinds = ("images-idx3-ubyte", "labels-idx1-ubyte")
    return [f"{prefix}-{kind}" for prefix, _ in SPLITS.values() for kind in kinds]


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not) as a numpy array, its header and size checked."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(
            f"cannot read '{path}' ({err}); re-download or reinstall the Fashion-MNIST files"
        ) from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        shown = f"0x{found:08x}" if found is not None else "a file shorter than 4 bytes"
        raise DataError(
            f"'{path}' is not an IDX file of {ndim}-D unsigned bytes (magic 0x{magic:08x}, found {shown}); "
            "re-download or reinstall the Fashion-MNIST files"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(
            f"'{path}' holds {len(raw) - header} data bytes but its header announces shape {shape} "
            f"({expected - header} bytes); the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels of ``train`` (60,000) or ``test`` (10,000).

    Any count is accepted as long as images and labels agree, so a folder holding a subset in the
    same format works too.
    """
    if split not in SPLITS:
        raise DataError(f"Fashion-MNIST split must be one of {', '.join(SPLITS)}, got '{split}'")
    root = Path(root)
    prefix, count = SPLITS[split]
    paths = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        found = _find(root, f"{prefix}-{kind}")
        if found is None:
            raise DataError(f"Fashion-MNIST is missing from '{root}' ({prefix}-{kind} not found); {HINT}")
        paths[kind] = found
    images = read_idx(paths["images-idx3-ubyte"], _IMAGES_MAGIC)
    labels = read_idx(paths["labels-idx1-ubyte"], _LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or not len(images):
        raise DataError(
            f"'{paths['images-idx3-ubyte']}' holds images of shape {images.shape} but Fashion-MNIST's are "
            f"{IMAGE_SIZE}x{IMAGE_SIZE} ({count} in the {split} split); point --data at the original files"
        )
    if labels.shape != images.shape[:1]:
        raise DataError(
            f"'{paths['labels-idx1-ubyte']}' holds {labels.shape[0]} labels but its images file holds "
            f"{images.shape[0]} images; point --data at a matching pair of files"
        )
    if labels.max(initial=0) >= len(CLASSES):
        raise DataError(
            f"'{paths['labels-idx1-ubyte']}' holds label {int(labels.max())} but Fashion-MNIST has "
            f"{len(CLASSES)} classes (0-9); point --data at the original files"
        )
    return images, labels.astype(np.int64)


def fashion_mnist_splits(
    data: str | os.PathLike = SCHEME,
    train_transform: Callable[[Image.Image], Any] | None = None,
    val_transform: Callable[[Image.Image], Any] | None = None,
) -> tuple[ImageArrayDataset, ImageArrayDataset]:
    """The 60,000 training and the 10,000 test images as data sets of grey images shown as RGB."""
    root = fashion_mnist_dir(data)
    train_images, train_labels = load_split(root, "train")
    test_images, test_labels = load_split(root, "test")
    train = ImageArrayDataset(train_images, train_labels, CLASSES, train_transform)
    test = ImageArrayDataset(test_images, test_labels, CLASSES, val_transform)
    return train, test

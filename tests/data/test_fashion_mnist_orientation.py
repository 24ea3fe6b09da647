"""Fashion-MNIST images come out upright: the image a data set item holds has, at row r and column c,
the byte the IDX file stores there (row-major, after the 16-byte header), checked against bytes written
here and, where the real files are installed, against the raw bytes of the real file."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from metaformer.data import fashion_mnist as fm

SIDE = fm.IMAGE_SIZE
HEADER = 16  # magic, count, rows, columns: four big-endian 32-bit integers


def idx_bytes(magic: int, shape: tuple[int, ...], data: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape) + data


def asymmetric(index: int) -> bytes:
    """Row-major bytes of an image no flip or transpose maps onto itself: a bright top row, a mid-grey
    left column below it, and a ramp that grows along the rows faster than down the columns."""
    pixels = bytearray()
    for row in range(SIDE):
        for col in range(SIDE):
            if row == 0:
                value = 255
            elif col == 0:
                value = 128
            else:
                value = (3 * col + row + 7 * index) % 120
            pixels.append(value)
    return bytes(pixels)


def test_a_written_image_reads_back_upright_pixel_for_pixel(tmp_path):
    images = [asymmetric(i) for i in range(3)]
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(
            idx_bytes(0x803, (len(images), SIDE, SIDE), b"".join(images))
        )
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(
            idx_bytes(0x801, (len(images),), bytes([1, 2, 3]))
        )
    train, test = fm.fashion_mnist_splits(f"fashion-mnist:{tmp_path}")
    for data in (train, test):
        for index, stored in enumerate(images):
            image, label = data[index]
            assert image.size == (SIDE, SIDE) and label == index + 1
            for row in range(SIDE):
                for col in range(SIDE):
                    # PIL's (x, y) is (column, row)
                    assert image.getpixel((col, row)) == (stored[row * SIDE + col],) * 3, (index, row, col)
    top_row = np.asarray(train[0][0])[0, :, 0]
    assert (top_row == 255).all()  # the bright row is at the top, not down the left side


def _raw_image(path: Path, index: int) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    start = HEADER + index * SIDE * SIDE
    return raw[start : start + SIDE * SIDE]


@pytest.mark.skipif(not fm.DEFAULT_DIR.is_dir(), reason="Fashion-MNIST is not installed here")
def test_a_real_image_reads_back_as_its_raw_bytes():
    root = fm.fashion_mnist_dir("fashion-mnist")
    train, test = fm.fashion_mnist_splits("fashion-mnist")
    for data, prefix, index in ((train, "train", 0), (train, "train", 12345), (test, "t10k", 42)):
        path = next(root / f"{prefix}-images-idx3-ubyte{gz}" for gz in ("", ".gz")
                    if (root / f"{prefix}-images-idx3-ubyte{gz}").is_file())  # fmt: skip
        stored = np.frombuffer(_raw_image(path, index), np.uint8).reshape(SIDE, SIDE)
        image = np.asarray(data[index][0])[..., 0]
        assert np.array_equal(image, stored), (prefix, index)
    assert train[0][1] == fm.CLASSES.index("Ankle boot")  # the first training image, as published

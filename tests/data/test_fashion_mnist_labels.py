"""Fashion-MNIST's label check sits at its class count: labels 0-9 read, label 10 is refused."""

import pytest

from metaformer.data import fashion_mnist as fm
from metaformer.errors import DataError


def write_split(root, labels: list[int]) -> None:
    n = len(labels)
    images = (0x803).to_bytes(4, "big") + b"".join(k.to_bytes(4, "big") for k in (n, 28, 28)) + bytes(n * 784)
    (root / "train-images-idx3-ubyte").write_bytes(images)
    (root / "train-labels-idx1-ubyte").write_bytes(
        (0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(labels)
    )


def test_the_last_class_reads_and_one_past_it_is_refused(tmp_path):
    write_split(tmp_path, list(range(len(fm.CLASSES))))
    assert fm.load_split(tmp_path, "train")[1].tolist() == list(range(10))
    write_split(tmp_path, [0, 5, len(fm.CLASSES)])
    with pytest.raises(DataError, match="holds label 10 but Fashion-MNIST has 10 classes"):
        fm.load_split(tmp_path, "train")

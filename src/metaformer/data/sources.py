"""Which data set a classification run uses, and which split: ``--data`` left out (the embedded digits),
``fashion-mnist[:DIR]``, or a folder of class folders (DIR/train + DIR/val, or one tree of which a seeded
fraction is held out). Training, evaluation and int8 calibration all choose through here."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from metaformer.data.embedded import digits_splits
from metaformer.data.fashion_mnist import fashion_mnist_splits, is_fashion_mnist

Transform = Callable[[Any], Any] | None


def classification_splits(
    data: str | os.PathLike | None,
    *,
    img_size: int,
    train_transform: Transform = None,
    val_transform: Transform = None,
    val_split: float,
    verify: bool = True,
    only: str | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[Dataset | None, Dataset | None]:
    """(train, val) of a run's data. ``only="train"`` or ``"val"`` asks for one split: a folder then reads
    just that one (``val`` from DIR/val with the checkpoint's ``classes``; the other side may be None).
    The embedded digits and Fashion-MNIST always give both (their val split: the digits' held-out 20%,
    Fashion-MNIST's 10,000 test images)."""
    if data is None:
        return digits_splits(img_size, train_transform=train_transform, val_transform=val_transform)
    if is_fashion_mnist(data):
        return fashion_mnist_splits(data, train_transform, val_transform)
    from metaformer.data.folders import folder_split, folder_splits, held_out_split  # imports torchvision

    root = Path(data)
    if only is None:
        return folder_splits(root, train_transform, val_transform, verify=verify, val_split=val_split)
    if only == "val" and ((root / "val").is_dir() or not root.is_dir()):
        chosen = None if classes is None else list(classes)
        return None, folder_split(root, "val", val_transform, classes=chosen)
    if only == "train" and (root / "train").is_dir():
        return folder_split(root, "train", train_transform), None
    return held_out_split(root, val_split, train_transform, val_transform)

"""The default data set: scikit-learn's bundled handwritten digits, rendered as small RGB images.

``sklearn.datasets.load_digits()`` ships 1,797 real 8x8 scans of the digits 0-9 inside the scikit-learn
wheel (UCI "Optical Recognition of Handwritten Digits", E. Alpaydin and C. Kaynak, CC BY 4.0), so
``metaformer classify train`` runs with no download and no data folder. Each scan (grey levels 0..16)
is scaled to 0..255, enlarged with bicubic interpolation to ``img_size`` (32 by default, the smallest
input a MetaFormer takes) and repeated over three channels. The train/val split is stratified and seeded,
so every run sees the same held-out images.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from metaformer.errors import ConfigError

DIGITS_IMG_SIZE = 32
DIGITS_CLASSES = tuple(str(i) for i in range(10))


@contextlib.contextmanager
def _python_random_kept() -> Iterator[None]:
    """Importing scikit-learn the first time draws from Python's ``random``, which the run has seeded
    and timm's transforms draw from: without this the first run in a process trained differently from
    the next (``ablate --jobs 1``, a notebook) and from a separate process."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


class ImageArrayDataset(Dataset):
    """(N, H, W, 3) uint8 RGB or (N, H, W) grey images in memory; items are (transform(RGB PIL image), label).

    Grey images stay one byte a pixel in memory (Fashion-MNIST's 60,000) and become RGB per item.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: tuple[str, ...],
        transform: Callable[[Image.Image], Any] | None = None,
    ):
        self.images = images
        self.targets = [int(t) for t in labels]
        self.classes = list(classes)
        self.transform = transform
        self.skipped: list[
            str
        ] = []  # same attribute as the folder data sets: nothing is ever unreadable here

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        pixels = self.images[index]
        image = Image.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L").convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


def render_digits(img_size: int = DIGITS_IMG_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as (N, img_size, img_size, 3) uint8 RGB images and their (N,) labels."""
    with _python_random_kept():
        from sklearn.datasets import load_digits

    if img_size < 8:
        raise ConfigError(f"img_size must be at least 8 for the digits data set, got {img_size}")
    digits = load_digits()
    grey = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    images = np.empty((len(grey), img_size, img_size, 3), dtype=np.uint8)
    for i, scan in enumerate(grey):
        big = Image.fromarray(scan, mode="L").resize((img_size, img_size), Image.Resampling.BICUBIC)
        images[i] = np.asarray(big)[..., None]
    return images, digits.target.astype(np.int64)


def digits_splits(
    img_size: int = DIGITS_IMG_SIZE,
    val_fraction: float = 0.2,
    seed: int = 0,
    train_transform: Callable[[Image.Image], Any] | None = None,
    val_transform: Callable[[Image.Image], Any] | None = None,
) -> tuple[ImageArrayDataset, ImageArrayDataset]:
    """Seeded, stratified train/val split of the digits (default 1,437 train / 360 val images)."""
    with _python_random_kept():
        from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    images, labels = render_digits(img_size)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed
    )
    train = ImageArrayDataset(images[train_idx], labels[train_idx], DIGITS_CLASSES, train_transform)
    val = ImageArrayDataset(images[val_idx], labels[val_idx], DIGITS_CLASSES, val_transform)
    return train, val

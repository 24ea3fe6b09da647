"""Image-folder data sets (``DIR/train/<class>/*``, ``DIR/val/<class>/*``) with up-front checks.

A folder without ``val/`` (``DIR/train/<class>/*`` alone, or just ``DIR/<class>/*``, the way most people
keep their labelled images) is split: a seeded, stratified hold-out of each class (``val_split``) is the
validation set. The split's seed is fixed, not the run's, so runs with different seeds validate on the
same images.

One policy for bad files: every candidate image is opened and verified once when the data set is built.
Files that fail are skipped, logged and counted (``dataset.skipped``, reported in the run summary); a
split with no readable image at all is a ``DataError``. A file that passes the check but fails to decode
later (truncated after its header) is logged and replaced by the next image rather than killing a run.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from metaformer.data.images import IMG_EXTENSIONS
from metaformer.errors import DataError

logger = logging.getLogger(__name__)

LAYOUT_HINT = (
    "expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (the ImageFolder layout), or one folder of "
    "class folders DIR/<class>/*.jpg that --val-split holds a part of out"
)
SPLIT_SEED = 0  # the hold-out of a folder without val/ does not follow the run's seed


def _image_is_readable(path: str) -> bool:
    """Open and verify the file's header and structure without decoding every pixel."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ValueError...)
        return False


class CheckedImageFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` that skips unreadable files and can reuse a class list.

    ``classes`` fixes the class order (the val split must use the train split's indices); ``verify``
    opens every file up front (turn it off for huge, known-good sets).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: list[str] | None = None,
        verify: bool = True,
    ):
        self._fixed_classes = classes
        self.skipped: list[str] = []

        def is_valid_file(path: str) -> bool:
            if not path.lower().endswith(IMG_EXTENSIONS):
                return False
            if verify and not _image_is_readable(path):
                self.skipped.append(path)
                return False
            return True

        super().__init__(str(root), transform=transform, is_valid_file=is_valid_file, allow_empty=True)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        found = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        if self._fixed_classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(self._fixed_classes))
            if unknown:
                raise DataError(
                    f"'{directory}' has class folders {', '.join(unknown[:5])} that the train split lacks; "
                    "give train/ and val/ the same class folders"
                )
            classes = list(self._fixed_classes)
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            try:
                return super().__getitem__(i)
            except (OSError, ValueError, SyntaxError) as err:
                logger.warning("skipping unreadable image %s (%s)", self.samples[i][0], err)
        raise DataError(f"no image in '{self.root}' could be decoded; check the files")


def _has_class_folders(folder: Path) -> bool:
    return folder.is_dir() and any(entry.is_dir() for entry in os.scandir(folder))


def check_layout(root: str | os.PathLike) -> Path:
    """Fail early, with the fix, on a missing data folder or one without class folders to train on."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder '{root}' does not exist; {LAYOUT_HINT}")
    if not root.is_dir():
        raise DataError(f"data path '{root}' is not a folder; {LAYOUT_HINT}")
    train_root(root)
    val_dir = root / "val"
    if val_dir.is_dir() and not _has_class_folders(val_dir):
        raise DataError(f"'{val_dir}' has no class folders; {LAYOUT_HINT}")
    return root


def train_root(root: Path) -> Path:
    """The folder of class folders to train on: DIR/train, or DIR itself when it has no train/ or val/."""
    if (root / "train").is_dir():
        if not _has_class_folders(root / "train"):
            raise DataError(f"'{root / 'train'}' has no class folders; {LAYOUT_HINT}")
        return root / "train"
    if (root / "val").is_dir():
        raise DataError(f"data folder '{root}' has a 'val' folder but no 'train' folder; {LAYOUT_HINT}")
    if not _has_class_folders(root):
        raise DataError(f"data folder '{root}' has no class folders; {LAYOUT_HINT}")
    return root


def stratified_split(targets: Sequence[int], fraction: float, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """(train indices, held-out indices): ``round(fraction x n)`` of each class's n items held out, at least
    one where the class has two or more, none where it has one; seeded, so the same files split alike."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the validation fraction must be between 0 and 1, got {fraction}")
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    train, held = [], []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        n_held = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        held.extend(int(i) for i in members[:n_held])
        train.extend(int(i) for i in members[n_held:])
    return sorted(train), sorted(held)


class FolderPart(Dataset):
    """Some of a folder data set's images, under their own transform (the two sides of a hold-out split)."""

    def __init__(
        self, base: CheckedImageFolder, indices: Sequence[int], transform: Callable[[Image.Image], Any] | None
    ):
        self.base = copy.copy(base)  # shares the file list, holds its own transform
        self.base.transform = transform
        self.indices = list(indices)
        self.classes = base.classes
        self.targets = [base.targets[i] for i in self.indices]
        self.skipped = base.skipped
        self.root = base.root

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.base[self.indices[index]]


def folder_splits(
    root: str | os.PathLike,
    train_transform: Callable[[Image.Image], Any] | None = None,
    val_transform: Callable[[Image.Image], Any] | None = None,
    verify: bool = True,
    val_split: float = 0.1,
) -> tuple[Dataset, Dataset]:
    """Train and val data sets of an ImageFolder tree; both use the train split's class indices. Without
    val/, ``val_split`` of each class is held out (``stratified_split``)."""
    root = check_layout(root)
    if (root / "val").is_dir():
        train = folder_split(root, "train", train_transform, verify=verify)
        val = folder_split(root, "val", val_transform, classes=train.classes, verify=verify)
        return train, val
    return held_out_split(root, val_split, train_transform, val_transform, verify=verify)


def held_out_split(
    root: str | os.PathLike,
    val_split: float,
    train_transform: Callable[[Image.Image], Any] | None = None,
    val_transform: Callable[[Image.Image], Any] | None = None,
    verify: bool = True,
) -> tuple[FolderPart, FolderPart]:
    """(train part, held-out part) of a folder without val/ (training and ``classify eval`` split alike)."""
    root = Path(root)
    source = train_root(check_layout(root))
    everything = folder_split(source.parent, source.name, None, verify=verify)
    train_idx, val_idx = stratified_split(everything.targets, val_split)
    if not val_idx:
        raise DataError(
            f"'{source}' has too few images to hold {val_split:g} of each class out (every class needs two "
            "or more); add images, or a val/ folder of class folders"
        )
    return FolderPart(everything, train_idx, train_transform), FolderPart(everything, val_idx, val_transform)


def folder_split(
    root: str | os.PathLike,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
    classes: list[str] | None = None,
    verify: bool = True,
) -> CheckedImageFolder:
    """One split (e.g. "val" for evaluation) of an ImageFolder tree, optionally with a fixed class list."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist; {LAYOUT_HINT}")
    split_dir = root / split
    if not split_dir.is_dir() or not any(entry.is_dir() for entry in os.scandir(split_dir)):
        raise DataError(f"data folder '{root}' has no '{split}' folder of class folders; {LAYOUT_HINT}")
    dataset = CheckedImageFolder(split_dir, transform, classes=classes, verify=verify)
    if not dataset.samples:
        bad = len(dataset.skipped)
        reason = f"all {bad} image files are unreadable" if bad else "it holds no image files"
        raise DataError(f"'{split_dir}' has no usable images ({reason}); add readable .jpg/.png images")
    if dataset.skipped:
        logger.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(dataset.skipped), split_dir,
                       dataset.skipped[0])  # fmt: skip
    return dataset

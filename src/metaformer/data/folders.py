"""Image-folder data sets (``DIR/train/<class>/*``, ``DIR/val/<class>/*``) with up-front checks.

One policy for bad files: every candidate image is opened and verified once when the data set is built.
Files that fail are skipped, logged and counted (``dataset.skipped``, reported in the run summary); a
split with no readable image at all is a ``DataError``. A file that passes the check but fails to decode
later (truncated after its header) is logged and replaced by the next image rather than killing a run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from metaformer.errors import DataError

logger = logging.getLogger(__name__)

LAYOUT_HINT = "expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg (the ImageFolder layout)"


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


def check_layout(root: str | os.PathLike) -> Path:
    """Fail early, with the fix, on a missing data folder or one without train/val class folders."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder '{root}' does not exist; {LAYOUT_HINT}")
    if not root.is_dir():
        raise DataError(f"data path '{root}' is not a folder; {LAYOUT_HINT}")
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(f"data folder '{root}' has no '{split}' folder; {LAYOUT_HINT}")
        if not any(entry.is_dir() for entry in os.scandir(split_dir)):
            raise DataError(f"'{split_dir}' has no class folders; {LAYOUT_HINT}")
    return root


def folder_splits(
    root: str | os.PathLike,
    train_transform: Callable[[Image.Image], Any] | None = None,
    val_transform: Callable[[Image.Image], Any] | None = None,
    verify: bool = True,
) -> tuple[CheckedImageFolder, CheckedImageFolder]:
    """Train and val data sets of an ImageFolder tree; both use the train split's class indices."""
    root = check_layout(root)
    train = folder_split(root, "train", train_transform, verify=verify)
    val = folder_split(root, "val", val_transform, classes=train.classes, verify=verify)
    return train, val


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

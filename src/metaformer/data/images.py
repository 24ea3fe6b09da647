"""Loose images for prediction: the files a command line names (one image, or a folder searched
recursively) and reading one as RGB, each failing in one sentence that names the path and the fix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from metaformer.errors import DataError

# the files an image folder holds: torchvision's ``datasets.folder.IMG_EXTENSIONS`` (a test keeps them
# equal), written here so that finding images does not import torchvision
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def count_images(folder: str | Path, stop: int) -> int:
    """How many image files ``folder`` and its subfolders hold, counting no further than ``stop`` (so
    that sizing up an ImageNet-scale tree takes a moment); 0 for a folder that does not exist."""
    count = 0
    for _, _, files in os.walk(folder):
        count += sum(1 for name in files if os.path.splitext(name)[1].lower() in IMG_EXTENSIONS)
        if count >= stop:
            return stop
    return count


def image_paths(inputs: str | Path, extensions: Sequence[str] = IMG_EXTENSIONS) -> list[Path]:
    """One image file, or every file with one of ``extensions`` in a folder and its subfolders (sorted)."""
    path = Path(inputs)
    if not path.exists():
        raise DataError(f"'{path}' does not exist; pass an image file or a folder of images")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise DataError(f"folder '{path}' holds no image files ({', '.join(extensions)}); pass another path")
    return files


def open_rgb(path: Path) -> Image.Image:
    """The image at ``path`` converted to RGB (decoded now, the file closed)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(
            f"cannot read image '{path}' ({type(err).__name__}); pass a readable image file"
        ) from None

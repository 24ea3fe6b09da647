"""Which images calibrate a classifier's int8 ranges: ``--calibration-data DIR``, or by default the
training data its run's ``config.json`` (beside the checkpoint) names: the embedded digits for the
demo, Fashion-MNIST's training images, or the folder's training images.

At most ``CALIBRATION_IMAGES`` images, a seeded sample, preprocessed with the eval transform (what
the quantized model will see). They are read lazily: a quantized model already in the cache never
opens them; the cache knows the set by its ``key`` (the folder's file list with sizes and times, or
the training data's name), never by reading every image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metaformer.data.fashion_mnist import is_fashion_mnist
from metaformer.data.images import IMG_EXTENSIONS
from metaformer.data.sources import classification_splits
from metaformer.deploy.quantize import CALIBRATION_IMAGES, Calibration
from metaformer.engine.state import read_run_config
from metaformer.errors import DataError

logger = logging.getLogger(__name__)

BATCH = 32


def transform_key(preproc: Mapping[str, Any], size: int) -> str:
    """The eval preprocessing in a few words: part of a calibration set's identity."""
    parts = [size, *(preproc.get(k) for k in ("crop_pct", "interpolation", "mean", "std"))]
    return json.dumps(parts, default=str)


def calibration_set(
    checkpoint: str | os.PathLike | None,
    folder: str | os.PathLike | None,
    transform: Callable[[Image.Image], torch.Tensor],
    preprocessing: str,
    *,
    limit: int = CALIBRATION_IMAGES,
) -> Calibration | None:
    """The calibration images for ``checkpoint``: from ``folder`` when given, else its training data;
    None when neither is known (int8 then asks for ``--calibration-data``)."""
    if folder is not None:
        return _from_folder(Path(folder), transform, preprocessing, limit)
    data = _training_data(checkpoint)
    if data is None:
        return None
    name, dataset = data
    key = f"train-data:{name}|{preprocessing}"
    return Calibration(_sample(lambda: dataset(transform), limit), key, limit)


def run_record(checkpoint: str | os.PathLike | None) -> dict[str, Any] | None:
    """The ``config.json`` of the training run beside ``checkpoint`` when it names the run's data (a
    classify run's), else None."""
    config = read_run_config(checkpoint) if checkpoint is not None else None
    return config if config is not None and "data" in config else None


def _training_data(checkpoint: str | os.PathLike | None) -> tuple[str, Callable[[Any], Any]] | None:
    """(a name, a builder of the training split under a transform) from the run's config.json, or None."""
    config = run_record(checkpoint)
    if config is None:
        return None
    data, size = config.get("data"), int(config.get("img_size") or 32)
    split = float(config.get("val_split") or 0.1)

    def train_split(tf: Any) -> Any:
        splits = classification_splits(data, img_size=size, train_transform=tf, val_split=split, only="train")
        return splits[0]

    if data is None:
        return f"digits-{size}", train_split
    if is_fashion_mnist(data):
        return str(data), train_split
    root = Path(data)
    if (root / "train").is_dir():
        return str(root.resolve()), train_split
    return f"{root.resolve()}|{split}", train_split


def _sample(build: Callable[[], Any], limit: int) -> Iterator[torch.Tensor]:
    """Batches of a seeded sample of ``limit`` images of the data set ``build()`` gives (built lazily)."""
    dataset = build()
    order = np.random.default_rng(0).permutation(len(dataset))[:limit]
    for start in range(0, len(order), BATCH):
        yield torch.stack([dataset[int(i)][0] for i in order[start : start + BATCH]])


def _from_folder(
    root: Path, transform: Callable[[Image.Image], torch.Tensor], preprocessing: str, limit: int
) -> Calibration:
    if not root.is_dir():
        raise DataError(
            f"calibration folder '{root}' does not exist; pass --calibration-data DIR, a folder of images"
        )
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    except OSError as err:
        raise DataError(
            f"cannot read calibration folder '{root}' ({err.strerror}); pass a readable folder"
        ) from None
    if not files:
        raise DataError(
            f"calibration folder '{root}' holds no image files ({', '.join(IMG_EXTENSIONS)}); "
            "pass a folder with a few hundred of your images"
        )
    order = np.random.default_rng(0).permutation(len(files))[:limit]
    chosen = [files[int(i)] for i in sorted(order)]
    digest = hashlib.sha256(preprocessing.encode())
    for path in chosen:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return Calibration(_read(chosen, transform, root), f"folder:{digest.hexdigest()}", limit)


def _read(
    paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor], root: Path
) -> Iterator[torch.Tensor]:
    images, skipped = [], 0
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
        except (OSError, ValueError, SyntaxError):
            skipped += 1
            continue
        if len(images) == BATCH:
            yield torch.stack(images)
            images = []
    if images:
        yield torch.stack(images)
    if skipped == len(paths):
        raise DataError(
            f"calibration folder '{root}': all {skipped} image files are unreadable; pass readable images"
        )
    if skipped:
        logger.warning("skipped %d unreadable calibration image(s) in %s", skipped, root)


__all__ = ["calibration_set", "run_record", "transform_key"]

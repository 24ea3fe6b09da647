"""Train and eval transforms, built by ``timm.data.create_transform`` (never re-written here).

The paper's ImageNet recipe (PAPER.md section 4) is ``train_transform(224, auto_augment=
"rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="random")`` and, for evaluation,
``eval_transform(224, crop_pct=0.9)``: resize the short side to 224 / 0.9 = 248 (bicubic), centre-crop 224.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from timm.data import create_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    img_size: int,
    *,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
    color_jitter: float | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], Any]:
    """Random-resized crop, flip, optional RandAugment string and random erasing (PIL image -> tensor)."""
    return create_transform(
        img_size,
        is_training=True,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        vflip=0.0,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=1,
    )


def eval_transform(
    img_size: int,
    *,
    crop_pct: float = 0.9,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], Any]:
    """Resize the short side to ``img_size / crop_pct``, centre-crop ``img_size``, normalise."""
    return create_transform(
        img_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )


def eval_transform_from_preprocessing(preprocessing: Mapping[str, Any]) -> Callable[[Any], Any]:
    """The eval transform a weights record reports its accuracy with (timm data-config keys)."""
    return eval_transform(
        int(preprocessing["input_size"][-1]),
        crop_pct=float(preprocessing.get("crop_pct", 0.9)),
        interpolation=str(preprocessing.get("interpolation", "bicubic")),
        mean=preprocessing.get("mean", IMAGENET_MEAN),
        std=preprocessing.get("std", IMAGENET_STD),
    )

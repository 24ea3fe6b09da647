"""Train and eval transforms, built by ``timm.data.create_transform``.

The paper's ImageNet recipe (PAPER.md section 4) is ``train_transform(224, auto_augment=
"rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="random")`` and, for evaluation,
``eval_transform(224, crop_pct=0.9)``: resize the short side to 224 / 0.9 = 248 (bicubic), centre-crop 224.

timm (and through it torchvision, which imports torch's compiler stack) takes seconds to import, more
than a one-image ``classify predict`` spends on everything else. So timm is imported where a transform
is built, and the eval transform of an RGB PIL image, the one every prediction runs, is done with PIL
and torch alone: the same steps as timm's (torchvision's ``Resize`` of a PIL image is PIL's ``resize``),
equal to it value for value (tests/data/test_transforms.py checks), with timm's own pipeline for any
other input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

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
    from timm.data import create_transform

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
    return EvalTransform(img_size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)


_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


class EvalTransform:
    """timm's eval transform (``create_transform(img_size, is_training=False, ...)``): RGB PIL images
    without importing timm, anything else (a tensor, another image mode) by timm's pipeline, built on
    first use."""

    def __init__(
        self,
        img_size: int,
        *,
        crop_pct: float = 0.9,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.img_size = int(img_size)
        self.crop_pct = crop_pct
        self.interpolation = interpolation
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._timm: Callable[[Any], Any] | None = None
        if interpolation not in _PIL_RESAMPLE:  # timm's own check and error, now as before
            self._timm_transform()

    def _timm_transform(self) -> Callable[[Any], Any]:
        if self._timm is None:
            from timm.data import create_transform

            self._timm = create_transform(
                self.img_size,
                is_training=False,
                crop_pct=self.crop_pct,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
            )
        return self._timm

    @property
    def transforms(self) -> list[Callable[[Any], Any]]:
        """The steps, as timm's ``Compose`` lists them (Resize, CenterCrop, ToTensor, Normalize)."""
        return list(self._timm_transform().transforms)  # type: ignore[attr-defined]

    def __call__(self, image: Any) -> Any:
        rgb = isinstance(image, Image.Image) and image.mode == "RGB"
        if not rgb or self.interpolation not in _PIL_RESAMPLE:
            return self._timm_transform()(image)
        size = self.img_size
        # torchvision Resize(int): the short side to floor(size / crop_pct), the long side truncated
        short_target = math.floor(size / (self.crop_pct or 0.875))
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        if short != short_target:
            new_long = int(short_target * long / short)
            new = (short_target, new_long) if width <= height else (new_long, short_target)
            image = image.resize(new, _PIL_RESAMPLE[self.interpolation])
        # torchvision CenterCrop: zero padding where the image is smaller, then the rounded centre
        width, height = image.size
        if size > width or size > height:
            padded = Image.new("RGB", (max(width, size), max(height, size)))
            padded.paste(image, (max(size - width, 0) // 2, max(size - height, 0) // 2))
            image = padded
            width, height = image.size
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        # ToTensor (uint8 HWC -> float CHW / 255) and Normalize
        pixels = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        tensor = pixels.to(dtype=torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).view(-1, 1, 1)
        return tensor.sub_(mean).div_(std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(img_size={self.img_size}, crop_pct={self.crop_pct}, "
            f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})"
        )


def eval_transform_from_preprocessing(
    preprocessing: Mapping[str, Any], img_size: int | None = None, crop_pct: float | None = None
) -> Callable[[Any], Any]:
    """The eval transform a weights record reports its accuracy with (timm data-config keys);
    ``img_size`` and ``crop_pct``, where given, override the record's."""
    return eval_transform(
        int(img_size if img_size is not None else preprocessing["input_size"][-1]),
        crop_pct=float(crop_pct if crop_pct is not None else preprocessing.get("crop_pct", 0.9)),
        interpolation=str(preprocessing.get("interpolation", "bicubic")),
        mean=preprocessing.get("mean", IMAGENET_MEAN),
        std=preprocessing.get("std", IMAGENET_STD),
    )

"""Semantic segmentation data: the ADE20K layout and a generic image-folder + mask-folder layout.

ADE20K (``layout="ade20k"``)::

    root/images/{training,validation}/*.jpg
    root/annotations/{training,validation}/*.png   0 = unlabelled, 1..150 = classes

read with ``reduce_zero_label`` as mmsegmentation does: 0 becomes the ignore index and every other
value moves down by one, so labels are 0..149. Generic (``layout="folder"``)::

    root/images/<split>/*.{jpg,png,...}
    root/masks/<split>/*.png                       0..K-1 = classes, 255 = ignore
    root/classes.txt                               K class names, one a line

Masks are paired with images by file stem. A mask value outside the class list (other than the
ignore value) raises DataError naming the file: the first few masks are checked when the data set is
opened, so a wrong class list fails before training starts, and every mask is checked when loaded.

The transforms follow the paper's mmsegmentation pipeline (PAPER.md 6.1): random rescale of
``scale`` by a ratio in ``ratio_range``, random crop with ``cat_max_ratio``, flip, photometric
distortion and padding for training; a keep-ratio resize to ``scale`` then to a multiple of 32 for
evaluation, where the prediction is compared with the mask at its original size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from metaformer.data.images import IMG_EXTENSIONS
from metaformer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
LAYOUTS = ("auto", "ade20k", "folder")
DEFAULT_SPLITS = {"ade20k": ("training", "validation"), "folder": ("train", "val")}
_CHECK_UP_FRONT = 8

# The 150 ADE20K (SceneParsing) classes in label order, as in mmsegmentation's ADE20KDataset.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


@dataclass(frozen=True)
class SegAugment:
    """The mmsegmentation pipeline's numbers. ``scale`` is (long side, short side) as in its img_scale."""

    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    size_divisor: int = 32

    def __post_init__(self) -> None:
        if min(self.scale) < 1 or min(self.crop_size) < 1:
            raise ConfigError(f"scale and crop size must be positive, got {self.scale} and {self.crop_size}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ConfigError(f"ratio_range must be 0 < low <= high, got {self.ratio_range}")


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a text file, one a line (blank lines skipped)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"class list {path} is a folder; pass a text file with one class name a line")
    if not path.is_file():
        raise DataError(f"class list {path} does not exist; write one class name a line or pass --classes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(
            f"class list {path} is not UTF-8 text (an image or a binary file?); write one class name a line"
        ) from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"class list {path} is empty; write one class name a line")
    return names


class SegmentationDataset(Dataset):
    """(image, mask) pairs; items are a float (3, H, W) image in [0, 1] and an int64 (H', W') mask.

    With ``train=True`` the training augmentation runs and the mask is cropped with the image; otherwise
    the image is resized for inference and the mask is returned at its original size.
    """

    def __init__(
        self,
        images: Sequence[Path],
        masks: Sequence[Path],
        class_names: Sequence[str],
        *,
        reduce_zero_label: bool = False,
        train: bool = False,
        augment: SegAugment | None = None,
        check: int = _CHECK_UP_FRONT,
    ):
        if len(images) != len(masks):
            raise DataError(f"{len(images)} images but {len(masks)} masks; every image needs one mask")
        if not images:
            raise DataError("the segmentation data set is empty; check the folder and split name")
        if not class_names:
            raise DataError("the class list is empty; a segmentation data set needs at least one class")
        if len(class_names) >= IGNORE_INDEX:
            raise DataError(f"{len(class_names)} classes do not fit 8-bit masks with {IGNORE_INDEX} = ignore")
        self.images = list(images)
        self.masks = list(masks)
        self.class_names = list(class_names)
        self.reduce_zero_label = reduce_zero_label
        self.train = train
        self.augment = augment or SegAugment()
        for path in self.masks[:check]:
            self.read_mask(path)
        for image, mask in zip(self.images, self.masks, strict=True):
            _check_sizes(image, mask)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.images)

    def read_mask(self, path: Path) -> np.ndarray:
        """(H, W) uint8 labels 0..K-1 and 255 = ignore (after ``reduce_zero_label``); stray values raise."""
        try:
            with Image.open(path) as img:
                if img.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(
                        f"mask {path} is a {img.mode} image; masks must be single-channel class ids (L or P)"
                    )
                raw = np.asarray(img)
        except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for broken files
            raise DataError(f"cannot read mask {path} ({err}); replace or remove it") from err
        raw = raw.astype(np.int64)
        if self.reduce_zero_label:
            labels = np.where(raw == 0, IGNORE_INDEX, raw - 1)
            labels[labels == IGNORE_INDEX - 1] = IGNORE_INDEX
            allowed = f"0..{self.num_classes} (0 = ignore)"
        else:
            labels = raw
            allowed = f"0..{self.num_classes - 1} or {IGNORE_INDEX} (ignore)"
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            value = int(raw[bad].max())
            raise DataError(
                f"mask {path} has value {value} but the class list has {self.num_classes} classes, so values "
                f"must be {allowed}; fix the mask or the class list"
            )
        return labels.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.images[index]
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"cannot read image {path} ({err}); replace or remove it") from err
        mask = self.read_mask(self.masks[index])
        if mask.shape != image.shape[:2]:
            raise DataError(
                f"mask {self.masks[index]} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}; masks must match their images"
            )
        x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255)
        y = torch.from_numpy(mask.astype(np.int64))
        if self.train:
            return train_transform(x, y, self.augment)
        return eval_resize(x, self.augment), y


def _header_size(path: Path, kind: str) -> tuple[int, int]:
    """(width, height) from the file's header; PIL's open is lazy, so no pixel is decoded."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(
            f"cannot read {kind} {path} ({type(err).__name__}: {err}); replace or remove it"
        ) from None


def _check_sizes(image: Path, mask: Path) -> None:
    """Every pair up front, from the headers only (about 0.1 ms a pair), so a wrong mask fails before
    training starts instead of inside a loader worker mid-epoch."""
    (iw, ih), (mw, mh) = _header_size(image, "image"), _header_size(mask, "mask")
    if (iw, ih) != (mw, mh):
        raise DataError(
            f"mask {mask} is {mw}x{mh} but its image {image.name} is {iw}x{ih}; masks must match their images"
        )


def rescale_size(height: int, width: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= scale[0] and short side <= scale[1]."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def eval_resize(image: torch.Tensor, aug: SegAugment) -> torch.Tensor:
    """Keep-ratio resize to ``aug.scale``, then up to a multiple of ``size_divisor`` (AlignResize)."""
    h, w = rescale_size(image.shape[1], image.shape[2], aug.scale)
    d = aug.size_divisor
    h, w = int(math.ceil(h / d)) * d, int(math.ceil(w / d)) * d
    return F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp_(0, 1)


def train_transform(
    image: torch.Tensor, mask: torch.Tensor, aug: SegAugment
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rescale, random crop (cat_max_ratio), flip, photometric distortion, pad to the crop size."""
    ratio = float(torch.empty(()).uniform_(*aug.ratio_range))
    h, w = rescale_size(image.shape[1], image.shape[2], (aug.scale[0] * ratio, aug.scale[1] * ratio))
    if (h, w) != tuple(image.shape[1:]):  # a same-size resize is the identity: skip it
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0].clamp_(0, 1)
        mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    ch, cw = min(aug.crop_size[0], h), min(aug.crop_size[1], w)
    top = left = 0
    for _ in range(10 if (ch, cw) != (h, w) else 0):  # a crop of the whole image has one position
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        crop = mask[top : top + ch, left : left + cw]
        if aug.cat_max_ratio >= 1:
            break
        counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < aug.cat_max_ratio:
            break
    image = image[:, top : top + ch, left : left + cw]
    mask = mask[top : top + ch, left : left + cw]
    if torch.rand(()) < aug.flip_prob:
        image, mask = image.flip(-1), mask.flip(-1)
    if aug.photometric:
        image = photometric_distortion(image)
    pad_h, pad_w = aug.crop_size[0] - ch, aug.crop_size[1] - cw
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image.contiguous(), mask.contiguous()


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a [0, 1] image: each step with probability 0.5.

    Brightness +-32/255 (additive) and contrast x[0.5, 1.5] (multiplicative) as mmseg does; saturation
    x[0.5, 1.5] and hue +-18/180 of the circle through torchvision's colour functions.
    """
    from torchvision.transforms.v2 import functional as TF

    def coin() -> bool:
        return bool(torch.rand(()) < 0.5)

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high))

    if coin():
        image = (image + uniform(-32 / 255, 32 / 255)).clamp(0, 1)
    contrast_first = coin()
    if contrast_first and coin():
        image = (image * uniform(0.5, 1.5)).clamp(0, 1)
    if coin():
        image = TF.adjust_saturation(image, uniform(0.5, 1.5))
    if coin():
        image = TF.adjust_hue(image, uniform(-0.1, 0.1))
    if not contrast_first and coin():
        image = (image * uniform(0.5, 1.5)).clamp(0, 1)
    return image


def open_segmentation(
    root: str | Path,
    split: str | None = None,
    *,
    layout: str = "auto",
    classes: str | Path | Sequence[str] | None = None,
    train: bool = False,
    augment: SegAugment | None = None,
) -> SegmentationDataset:
    """Open one split of an ADE20K-layout or generic-layout folder (see the module docstring)."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown segmentation layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass a segmentation data folder with --data")
    layout = detect_layout(root) if layout == "auto" else layout
    if split is None:
        split = DEFAULT_SPLITS[layout][0 if train else 1]
    mask_dir = root / ("annotations" if layout == "ade20k" else "masks") / split
    image_dir = root / "images" / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(
                f"folder {folder} does not exist; check --data, the layout ({layout}) and the split name"
            )
    if classes is None:
        names = list(ADE20K_CLASSES) if layout == "ade20k" else read_class_list(root / "classes.txt")
    elif isinstance(classes, (str, Path)):
        names = read_class_list(classes)
    else:
        names = list(classes)
    image_paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    mask_of = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    missing = [p.name for p in image_paths if p.stem not in mask_of]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir} (first: {missing[0]}); "
            "add the masks or remove the images"
        )
    if not image_paths:
        raise DataError(f"no images in {image_dir}; the data set is empty")
    return SegmentationDataset(
        image_paths,
        [mask_of[p.stem] for p in image_paths],
        names,
        reduce_zero_label=layout == "ade20k",
        train=train,
        augment=augment,
    )


def detect_layout(root: Path) -> str:
    """'ade20k' when ``annotations/`` holds split folders and there is no ``masks/``, else 'folder'."""
    ann = root / "annotations"
    if not (root / "masks").is_dir() and ann.is_dir() and any(p.is_dir() for p in ann.iterdir()):
        return "ade20k"
    return "folder"

"""The synthetic "shapes" data set: the default for ``metaformer detect`` and ``metaformer segment``.

Circles, rectangles and triangles of random colour, size and rotation, overlapping, on textured
backgrounds (smooth colour noise plus stripes plus pixel noise). Generated from a seed, so the same
options always give the same pixels, and written once to a cache folder as a real data set:

```
shapes-v1-<hash>/
  images/{train,val}/000000.png          RGB images
  annotations/instances_{train,val}.json COCO instances: boxes, areas, RLE masks, 3 categories
  instances/{train,val}/000000.png       instance ids (0 = background, k = k-th annotation of the image)
  masks/{train,val}/000000.png           class ids (0 = background, 1 circle, 2 rectangle, 3 triangle)
  classes.txt                            background, circle, rectangle, triangle
```

The detection task reads it through ``data.coco`` and the segmentation task through ``data.segmentation``
(the generic image-folder + mask-folder layout), the same code that reads real data. The folder is
built in a temporary directory and renamed into place, so an interrupted run never leaves half a set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from metaformer.errors import ConfigError

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "rectangle", "triangle")
SEGMENTATION_CLASSES = ("background", *SHAPE_CLASSES)
FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate. Object sizes are fractions of the image side."""

    num_train: int = 400
    num_val: int = 100
    img_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    min_size: float = 0.2
    max_size: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_val < 1:
            raise ConfigError(
                f"shapes needs at least one train and one val image, got {self.num_train}/{self.num_val}"
            )
        if self.img_size < 32:
            raise ConfigError(f"shapes img_size must be at least 32 pixels, got {self.img_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(
                f"shapes needs 1 <= min_objects <= max_objects, got {self.min_objects} and {self.max_objects}"
            )
        if not 0.05 <= self.min_size <= self.max_size <= 0.9:
            raise ConfigError(
                f"shapes object sizes must satisfy 0.05 <= min_size <= max_size <= 0.9, "
                f"got {self.min_size} and {self.max_size}"
            )

    def digest(self) -> str:
        text = json.dumps({"version": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def default_data_dir() -> Path:
    """Where generated data sets are cached: ``$METAFORMER_HOME/data`` or ``~/.cache/metaformer/data``."""
    from metaformer.weights import cache_dir

    return cache_dir() / "data"


def make_shapes(root: str | Path | None = None, config: ShapesConfig | None = None) -> Path:
    """Generate the set under ``root`` (default: the cache) unless it is there already; return its folder."""
    config = config or ShapesConfig()
    root = Path(root) if root is not None else default_data_dir()
    target = root / f"shapes-v{FORMAT_VERSION}-{config.digest()}"
    if (target / "classes.txt").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=root))
    try:
        _write(tmp, config)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same set first: keep theirs
            if not (target / "classes.txt").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "wrote the shapes data set (%d train / %d val images) to %s", config.num_train, config.num_val, target
    )
    return target


def _write(folder: Path, config: ShapesConfig) -> None:
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(config.seed)
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_CLASSES)
    ]
    for split, count in zip(SPLITS, (config.num_train, config.num_val), strict=True):
        for sub in ("images", "instances", "masks"):
            (folder / sub / split).mkdir(parents=True)
        images, annotations = [], []
        for index in range(count):
            image, objects = render_image(rng, config)
            name = f"{index:06d}.png"
            Image.fromarray(image).save(folder / "images" / split / name)
            instance_ids = np.zeros(image.shape[:2], dtype=np.uint8)
            class_ids = np.zeros(image.shape[:2], dtype=np.uint8)
            images.append(
                {"id": index + 1, "file_name": name, "width": config.img_size, "height": config.img_size}
            )
            for k, (label, mask) in enumerate(objects):
                instance_ids[mask] = k + 1
                class_ids[mask] = label
                ys, xs = np.nonzero(mask)
                x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": index + 1,
                        "category_id": label,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": int(mask.sum()),
                        "iscrowd": 0,
                        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                    }
                )
            Image.fromarray(instance_ids).save(folder / "instances" / split / name)
            Image.fromarray(class_ids).save(folder / "masks" / split / name)
        coco = {
            "info": {
                "description": "metaformer synthetic shapes",
                "version": FORMAT_VERSION,
                "config": dataclasses.asdict(config),
            },
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (folder / "annotations").mkdir(exist_ok=True)
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    (folder / "classes.txt").write_text("\n".join(SEGMENTATION_CLASSES) + "\n")


def render_image(
    rng: np.random.Generator, config: ShapesConfig
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One (S, S, 3) uint8 image and its objects as (category id 1..3, visible boolean mask), bottom first.

    Each new shape is drawn on top; a placement is retried if it would hide more than 40% of an earlier
    shape, so every object stays recognisable.
    """
    size = config.img_size
    image = _background(rng, size)
    full_masks: list[np.ndarray] = []
    labels: list[int] = []
    target = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(target):
        for _attempt in range(20):
            label = int(rng.integers(1, len(SHAPE_CLASSES) + 1))
            mask = _shape_mask(rng, label, size, config)
            if mask.sum() < 30:
                continue
            visible = [m & ~mask for m in _visible(full_masks)]
            if all(v.sum() >= 0.6 * m.sum() for v, m in zip(visible, full_masks, strict=True)):
                full_masks.append(mask)
                labels.append(label)
                break
    for mask in full_masks:
        _paint(rng, image, mask)
    return image, list(zip(labels, _visible(full_masks), strict=True))


def _visible(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Each mask minus everything drawn after it."""
    out, above = [], None
    for mask in reversed(masks):
        out.append(mask if above is None else mask & ~above)
        above = mask.copy() if above is None else above | mask
    return out[::-1]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour noise + stripes of random frequency and angle + pixel noise."""
    coarse = rng.uniform(40, 215, size=(4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
    )
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6, 24)
    wave = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    stripes = wave[..., None] * rng.uniform(10, 35) * rng.choice([-1.0, 1.0], size=3)
    noise = rng.normal(0, 6, size=(size, size, 3))
    return np.clip(smooth + stripes + noise, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, label: int, size: int, config: ShapesConfig) -> np.ndarray:
    extent = rng.uniform(config.min_size, config.max_size) * size
    radius = extent / 2
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    name = SHAPE_CLASSES[label - 1]
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    elif name == "rectangle":
        half_w = radius * rng.uniform(0.55, 1.0)
        half_h = radius * rng.uniform(0.55, 1.0)
        theta = rng.uniform(-math.pi / 6, math.pi / 6)
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        draw.polygon([_rotate(x, y, theta, cx, cy) for x, y in corners], fill=1)
    else:
        start = rng.uniform(0, 2 * math.pi)
        angles = [start + k * 2 * math.pi / 3 + rng.uniform(-0.25, 0.25) for k in range(3)]
        draw.polygon([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles], fill=1)
    return np.asarray(canvas, dtype=bool)


def _rotate(x: float, y: float, theta: float, cx: float, cy: float) -> tuple[float, float]:
    c, s = math.cos(theta), math.sin(theta)
    return (cx + c * x - s * y, cy + s * x + c * y)


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Fill the mask with a random colour that stands out from the background under it, plus some noise."""
    under = image[mask].astype(np.float32).mean(axis=0)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(10):
        if np.abs(colour - under).sum() >= 120:
            break
        colour = rng.uniform(0, 255, size=3)
    noise = rng.normal(0, 4, size=(int(mask.sum()), 3))
    image[mask] = np.clip(colour + noise, 0, 255).astype(np.uint8)

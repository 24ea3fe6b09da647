"""COCO-format detection data: an image folder plus an instances JSON (boxes, polygon or RLE masks).

Everything a training run would trip over later is checked when the data set is opened, with one
sentence naming the file and the fix: JSON that does not parse or lacks ``images``/``annotations``/
``categories``, an annotation pointing at an image id or category id that does not exist, image files
missing from the folder, and a data set left with no images. Boxes of zero or negative width or
height cannot be learned from, so they are skipped, counted (``skipped_boxes``) and logged once.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from metaformer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def require_pycocotools() -> Any:
    """pycocotools' mask module, or a ConfigError saying how to install it."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:  # pragma: no cover - pycocotools is installed in every test environment
        raise ConfigError(
            "detection needs pycocotools; install it with `pip install 'metaformer[detect]'`"
        ) from err
    return mask_utils


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """Parse an instances JSON and check its three top-level lists exist."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist; pass the COCO instances JSON of the split")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(
            f"annotation file {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "fix or regenerate it"
        ) from err
    except UnicodeDecodeError as err:
        raise DataError(f"annotation file {path} is not UTF-8 text; pass a COCO instances JSON") from err
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path} holds a JSON {type(data).__name__}, not a COCO object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(
                f"annotation file {path} has no '{key}' list; a COCO instances file needs images, "
                "annotations and categories"
            )
    return data


class CocoDetection(Dataset):
    """COCO instances as torchvision detection targets.

    Items are ``(image, target)``: a float (3, H, W) image in [0, 1] and a dict with ``boxes`` (N, 4)
    float xyxy pixels, ``labels`` (N,) int64 in 1..K (0 is the background), ``image_id``, and with
    ``masks=True`` also ``masks`` (N, H, W) uint8. Labels follow the categories sorted by id, so
    ``class_names[label - 1]`` names a label and ``cat_ids[label - 1]`` gives the JSON category id back.
    Crowd annotations are left out of the targets (COCOeval ignores matches to them).
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        *,
        masks: bool = False,
        train: bool = False,
        drop_empty: bool = False,
    ):
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.masks = masks
        self.train = train
        if masks:
            require_pycocotools()
        data = read_coco_json(self.annotation_file)
        where = f"annotation file {self.annotation_file}"

        categories = sorted(data["categories"], key=lambda c: c.get("id", 0))
        try:
            self.cat_ids = [int(c["id"]) for c in categories]
            self.class_names = [str(c["name"]) for c in categories]
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(
                f"{where} has a category without an integer 'id' and a 'name'; fix the categories"
            ) from err
        if not self.cat_ids:
            raise DataError(f"{where} has no categories; a detection data set needs at least one")
        if len(set(self.cat_ids)) != len(self.cat_ids):
            raise DataError(f"{where} repeats a category id; category ids must be unique")
        label_of = {cat: i + 1 for i, cat in enumerate(self.cat_ids)}

        images: dict[int, dict[str, Any]] = {}
        for image in data["images"]:
            try:
                image_id = int(image["id"])
                images[image_id] = {
                    "file_name": str(image["file_name"]),
                    "height": image.get("height"),
                    "width": image.get("width"),
                }
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(f"{where} has an image entry without 'id' and 'file_name'; fix it") from err

        self.skipped_boxes = 0
        per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ann in data["annotations"]:
            image_id = ann.get("image_id")
            if image_id not in images:
                raise DataError(
                    f"annotation {ann.get('id')} in {self.annotation_file} references image id {image_id}, "
                    "which is not in 'images'; remove the annotation or add the image"
                )
            if ann.get("category_id") not in label_of:
                raise DataError(
                    f"annotation {ann.get('id')} in {self.annotation_file} has category id "
                    f"{ann.get('category_id')}, which is not in 'categories'; fix it or add the category"
                )
            bbox = ann.get("bbox")
            if not (isinstance(bbox, Sequence) and len(bbox) == 4):
                raise DataError(
                    f"annotation {ann.get('id')} in {self.annotation_file} has bbox {bbox!r}; "
                    "COCO boxes are [x, y, width, height]"
                )
            if ann.get("iscrowd", 0):
                continue
            if not (float(bbox[2]) > 0 and float(bbox[3]) > 0):
                self.skipped_boxes += 1
                continue
            per_image[image_id].append(ann)
        if self.skipped_boxes:
            logger.warning(
                "%s: skipped %d box(es) of zero or negative width or height",
                self.annotation_file,
                self.skipped_boxes,
            )

        ids = sorted(images)
        if drop_empty:
            ids = [i for i in ids if per_image.get(i)]
        if not ids:
            raise DataError(
                f"{where} lists no {'annotated ' if drop_empty else ''}images; the data set is empty"
            )
        if not self.images_dir.is_dir():
            raise DataError(
                f"image folder {self.images_dir} does not exist; pass the folder the JSON's file names are in"
            )
        on_disk = _list_files(self.images_dir)
        missing = [images[i]["file_name"] for i in ids if images[i]["file_name"] not in on_disk]
        if missing:
            raise DataError(
                f"{len(missing)} image(s) listed in {self.annotation_file} are missing from "
                f"{self.images_dir} (first: {missing[0]}); pass the right image folder"
            )
        self.ids = ids
        self.images = images
        self.annotations = dict(per_image)
        self.label_of = label_of

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        info = self.images[image_id]
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as img:
                pil = img.convert("RGB")
        except OSError as err:
            raise DataError(f"cannot read image {path} ({err}); replace or remove it") from err
        width, height = pil.size
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        anns = self.annotations.get(image_id, [])
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target: dict[str, Any] = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
        }
        if self.masks:
            target["masks"] = torch.from_numpy(
                np.stack([annotation_to_mask(a, height, width) for a in anns])
                if anns
                else np.zeros((0, height, width), dtype=np.uint8)
            )
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            target["boxes"] = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
            )
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def annotation_to_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """A polygon, uncompressed-RLE or compressed-RLE ``segmentation`` as an (H, W) uint8 mask."""
    mask_utils = require_pycocotools()
    seg = ann.get("segmentation")
    if not seg:
        raise DataError(f"annotation {ann.get('id')} has no 'segmentation'; masks need polygons or RLE")
    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(np.uint8)


def collate_detection(
    batch: list[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches stay lists: images differ in size and targets in length."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def coco_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """(images folder, instances JSON) of a split in the COCO layout.

    Images are in ``root/<split>`` (COCO's own layout, e.g. ``train2017``) or ``root/images/<split>``;
    the JSON is ``root/annotations/instances_<split>.json``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass a COCO-layout folder with --data")
    ann = root / "annotations" / f"instances_{split}.json"
    for images in (root / split, root / "images" / split):
        if images.is_dir():
            return images, ann
    raise DataError(
        f"no image folder for split '{split}' in {root} (looked for {split}/ and images/{split}/); "
        "check --data and the split names"
    )


def _list_files(folder: Path) -> set[str]:
    """Every file below ``folder`` as a path relative to it (COCO file names may include subfolders)."""
    names = set()
    for dirpath, _dirs, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        for name in files:
            names.add(name if rel == "." else os.path.join(rel, name))
    return names

"""COCO metrics for torchvision detections: pycocotools' COCOeval (bbox / segm AP, AP50, AP75, APs, APm, APl
as fractions in [0, 1]), the ground truth built from an instances dict, and detections as COCO results."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from metaformer.data.coco import require_pycocotools

logger = logging.getLogger(__name__)

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ground_truth(data: dict[str, Any]) -> Any:
    """A pycocotools COCO object from a parsed instances dict, built quietly (pycocotools prints).

    Boxes of zero or negative size are left out, as ``CocoDetection`` leaves them out of training.
    """
    require_pycocotools()
    from pycocotools.coco import COCO

    data = dict(data)
    annotations = []
    for ann in data["annotations"]:
        if not (float(ann["bbox"][2]) > 0 and float(ann["bbox"][3]) > 0):
            continue  # skipped for training too (CocoDetection counts them)
        if "area" not in ann or "iscrowd" not in ann:
            ann = {"iscrowd": 0, "area": float(ann["bbox"][2]) * float(ann["bbox"][3]), **ann}
        annotations.append(ann)
    data["annotations"] = annotations
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(
    ground_truth: Any,
    results: Sequence[dict[str, Any]],
    *,
    iou_types: Iterable[str] = ("bbox",),
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl per IoU type, keyed ``bbox_AP`` ..., as fractions.

    ``ground_truth`` is a pycocotools COCO object (see ``coco_ground_truth``); ``results`` are COCO
    result dicts. No detections at all scores 0, not an error. ``image_ids`` restricts the evaluation
    to the images that were run (default: every image in the ground truth).
    """
    require_pycocotools()
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        if not results:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in COCO_METRICS})
            continue
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            detections = ground_truth.loadRes([dict(r) for r in results])
            evaluator = COCOeval(ground_truth, detections, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(set(image_ids))
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        logger.debug("COCOeval %s:\n%s", iou_type, buffer.getvalue())
        # stats[0..5]: AP@[.5:.95], AP50, AP75, AP small/medium/large; -1 means "no such objects"
        for name, value in zip(COCO_METRICS, evaluator.stats[:6], strict=True):
            metrics[f"{iou_type}_{name}"] = max(float(value), 0.0)
    return metrics


def to_coco_results(
    outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int], cat_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """torchvision detections (xyxy boxes, labels 1..K, (N, 1, H, W) mask probabilities) -> COCO results."""
    results = []
    for output, image_id in zip(outputs, image_ids, strict=True):
        boxes = output["boxes"].detach().cpu().float()
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        rles = masks_to_rle(output["masks"]) if "masks" in output else None
        for k, (box, score, label) in enumerate(zip(xywh, scores, labels, strict=True)):
            if not 1 <= label <= len(cat_ids):
                continue
            result = {
                "image_id": int(image_id),
                "category_id": int(cat_ids[label - 1]),
                "bbox": [round(v, 2) for v in box],
                "score": round(float(score), 5),
            }
            if rles is not None:
                result["segmentation"] = rles[k]
            results.append(result)
    return results


def masks_to_rle(masks: torch.Tensor, threshold: float = 0.5) -> list[dict[str, Any]]:
    """(N, 1, H, W) mask probabilities -> compressed RLE dicts with ASCII counts (JSON-ready)."""
    mask_utils = require_pycocotools()
    binary = (masks.detach().cpu()[:, 0] > threshold).numpy().astype(np.uint8)
    rles = []
    for mask in binary:
        rle = mask_utils.encode(np.asfortranarray(mask))
        rles.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return rles

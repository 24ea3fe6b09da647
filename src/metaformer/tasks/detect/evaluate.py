"""``metaformer detect eval``: COCO bbox (and segm) AP of a detector checkpoint on a COCO-layout split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from metaformer.data.coco import CocoDetection, coco_split, collate_detection, read_coco_json
from metaformer.engine import skeleton
from metaformer.engine.distributed import pick_device
from metaformer.engine.skeleton import seeded_subset
from metaformer.options import AT_LEAST_1, option
from metaformer.tasks import command
from metaformer.tasks.dense.data import data_root
from metaformer.tasks.dense.files import check_classes
from metaformer.tasks.dense.options import DenseEvalOptions
from metaformer.tasks.detect.coco_eval import coco_ground_truth
from metaformer.tasks.detect.model import load_detector
from metaformer.tasks.detect.train import SHAPES_DETECT, DetectionTask
from metaformer.weights import atomic_write


@dataclass(frozen=True, kw_only=True)
class DetectEvalConfig(DenseEvalOptions):
    """Evaluate a detector checkpoint on a COCO-layout split (default: the shapes set's val split)."""

    TASK: ClassVar[str] = "detect"
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "data": {"help": "COCO-layout folder (default: the generated shapes set)"},
        "split": {"help": "split to evaluate (val2017 with --data, else val)"},
    }

    batch_size: int = option(8, metavar="N", check=AT_LEAST_1)
    results: str | None = option(None, "also write the detections as COCO results JSON", metavar="JSON")


@command(
    "eval",
    DetectEvalConfig,
    "COCO bbox/segm AP of a checkpoint",
    "COCO AP, AP50, AP75, APs, APm, APl (pycocotools) of a detect checkpoint.",
)
def evaluate_detector(config: DetectEvalConfig) -> dict[str, Any]:
    """COCO bbox (and segm) metrics of a checkpoint; optionally writes the COCO results JSON."""
    model, class_names, cat_ids = load_detector(config.checkpoint)
    masks = model.detector_config.masks  # type: ignore[union-attr]
    root = Path(data_root(config.data, SHAPES_DETECT))
    split = config.split or ("val2017" if config.data is not None else "val")
    images, ann = coco_split(root, split)
    dataset = CocoDetection(images, ann, masks=False)
    check_classes(config.checkpoint, class_names, dataset.class_names, str(root))
    task = DetectionTask(coco_ground_truth(read_coco_json(ann)), class_names, dataset.cat_ids, masks=masks)
    subset = seeded_subset(dataset, config.limit, 1)
    device = pick_device(config.device)
    metrics, seconds = skeleton.evaluate_dataset(
        task, model.to(device), subset, device=device, batch_size=config.batch_size,
        num_workers=config.num_workers, progress=config.progress, collate_fn=collate_detection,
    )  # fmt: skip
    if config.results:
        with atomic_write(config.results) as tmp:
            tmp.write_text(json.dumps(task.results))
    return {
        "checkpoint": str(config.checkpoint),
        "data": str(root),
        "split": split,
        "images": len(subset),  # type: ignore[arg-type]
        "skipped_boxes": dataset.skipped_boxes,
        "seconds": seconds,
        "results": config.results,
        **metrics,
    }

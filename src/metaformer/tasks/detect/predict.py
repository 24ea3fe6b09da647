"""``metaformer detect predict``: a detector run on images, the detections drawn and written as COCO
results."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from metaformer.data.images import image_paths
from metaformer.engine.distributed import pick_device
from metaformer.options import PROBABILITY, option
from metaformer.tasks import command
from metaformer.tasks.dense.files import read_rgb, save_png
from metaformer.tasks.dense.options import DensePredictOptions
from metaformer.tasks.detect.coco_eval import to_coco_results
from metaformer.tasks.detect.model import load_detector
from metaformer.weights import atomic_write


# --------------------------------------------------------------------------- drawing
def class_colours(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, stable colours: evenly spaced hues."""
    import colorsys

    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(num_classes, 1), 0.85, 0.95))  # type: ignore[misc]
        for i in range(num_classes)
    ]


def draw_detections(
    image: torch.Tensor,
    output: dict[str, torch.Tensor],
    class_names: Sequence[str],
    *,
    score_thresh: float = 0.5,
) -> torch.Tensor:
    """The (3, H, W) float image in [0, 1] with masks, boxes and 'name score' labels drawn, as uint8."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    canvas = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    keep = output["scores"].detach().cpu() >= score_thresh
    labels = output["labels"].detach().cpu()[keep].tolist()
    if not labels:
        return canvas
    palette = class_colours(len(class_names))
    colours = [palette[(label - 1) % len(palette)] for label in labels]
    if "masks" in output:
        masks = output["masks"].detach().cpu()[keep][:, 0] > 0.5
        canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=colours)
    names = [
        f"{class_names[label - 1] if 1 <= label <= len(class_names) else label} {score:.2f}"
        for label, score in zip(labels, output["scores"].detach().cpu()[keep].tolist(), strict=True)
    ]
    return draw_bounding_boxes(
        canvas, output["boxes"].detach().cpu()[keep], labels=names, colors=colours, width=2
    )


@dataclass(frozen=True, kw_only=True)
class DetectPredictConfig(DensePredictOptions):
    """Run a detector on an image or a folder; draw the detections and write them as COCO results."""

    TASK: ClassVar[str] = "detect"
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {"output": {"help": "where drawings and JSON go"}}

    score_thresh: float = option(0.5, "keep detections scoring >= S", metavar="S", check=PROBABILITY)


@command(
    "predict",
    DetectPredictConfig,
    "draw detections on images and write COCO results JSON",
)
def predict_detections(config: DetectPredictConfig) -> dict[str, Any]:
    """Writes ``<output>/<image stem>.png`` (boxes, masks, labels drawn) and ``<output>/detections.json``."""
    from torchvision.io import write_png  # noqa: F401 - fails early if torchvision lacks PNG support

    model, class_names, cat_ids = load_detector(config.checkpoint)
    device = pick_device(config.device)
    model = model.to(device)
    # the detector drops boxes under its own cut (0.05, COCO evaluation's) before --score-thresh applies:
    # a lower --score-thresh lowers it too, so 0 keeps every detection the model makes
    heads = model.roi_heads if hasattr(model, "roi_heads") else model
    heads.score_thresh = min(heads.score_thresh, config.score_thresh)
    out = Path(config.output)
    paths = image_paths(config.inputs)
    results, drawn = [], []
    for index, path in enumerate(paths, start=1):
        image = read_rgb(path)
        with torch.no_grad():
            output = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
        keep = output["scores"] >= config.score_thresh
        output = {k: v[keep] for k, v in output.items()}
        for result in to_coco_results([output], [index], cat_ids):
            results.append({**result, "file_name": path.name})
        target = out / f"{path.stem}.png"
        save_png(draw_detections(image, output, class_names, score_thresh=config.score_thresh), target)
        drawn.append({"path": str(path), "drawn": str(target), "detections": int(keep.sum())})
    with atomic_write(out / "detections.json") as tmp:
        tmp.write_text(json.dumps(results))
    return {"images": drawn, "results": str(out / "detections.json"), "detections": len(results)}

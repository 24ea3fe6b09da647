"""``metaformer segment predict``: a Semantic FPN run on images, each written as a colour overlay and a
label PNG."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaformer.data.images import image_paths
from metaformer.data.segmentation import eval_resize
from metaformer.deploy.options import DeployOptions
from metaformer.engine.distributed import pick_device
from metaformer.options import PROBABILITY, option
from metaformer.tasks import command
from metaformer.tasks.dense.files import read_rgb, save_png
from metaformer.tasks.dense.options import DensePredictOptions
from metaformer.tasks.segment.checkpoint import load_segmenter
from metaformer.tasks.segment.deploy import prepare_segmenter
from metaformer.tasks.segment.train import SHAPES_SEGMENT


@torch.no_grad()
def predict_labels(model: nn.Module, image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class ids (H, W) for one resized image (3, h, w), at ``size`` = the original (H, W)."""
    logits = model(image[None])
    logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(1)[0]


def segmentation_palette(num_classes: int) -> list[tuple[int, int, int]]:
    """Stable colours per class (evenly spaced hues, alternating brightness)."""
    import colorsys

    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / max(num_classes, 1), 0.8, 0.95 - 0.3 * (i % 2)))  # type: ignore[misc]
        for i in range(num_classes)
    ]


def draw_segmentation(
    image: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float = 0.5
) -> torch.Tensor:
    """The (3, H, W) [0, 1] image with each class painted over it in its colour, as uint8."""
    from torchvision.utils import draw_segmentation_masks

    canvas = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    labels = labels.cpu()
    present = [c for c in range(num_classes) if (labels == c).any()]
    if not present:
        return canvas
    masks = torch.stack([labels == c for c in present])
    palette = segmentation_palette(num_classes)
    return draw_segmentation_masks(canvas, masks, alpha=alpha, colors=[palette[c] for c in present])


@dataclass(frozen=True, kw_only=True)
class SegmentPredictConfig(DeployOptions, DensePredictOptions):
    """Run a Semantic FPN on an image or a folder; write a colour overlay PNG and a label PNG per image."""

    TASK: ClassVar[str] = "segment"
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {"output": {"help": "where the PNGs go"}}

    alpha: float = option(0.5, "overlay opacity (0.5)", metavar="A", check=PROBABILITY)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_deploy()


@command(
    "predict",
    SegmentPredictConfig,
    "colour overlay and label PNGs for images",
)
def predict_segmentation(config: SegmentPredictConfig) -> dict[str, Any]:
    """``<output>/<stem>_overlay.png`` (classes painted over the image) and ``<output>/<stem>_labels.png``
    (class ids 0..K-1 at the image's size)."""
    model, class_names, augment = load_segmenter(config.checkpoint)
    device = pick_device(config.device)
    paths = image_paths(config.inputs)
    first = eval_resize(read_rgb(paths[0]), augment) if paths else torch.zeros(3, 64, 64)
    model, backend = prepare_segmenter(
        model.to(device), config, checkpoint=config.checkpoint, augment=augment, class_names=class_names,
        device=device, img_size=tuple(first.shape[-2:]), images=len(paths), shapes=SHAPES_SEGMENT,  # type: ignore[arg-type]
    )  # fmt: skip
    out = Path(config.output)
    written = []
    for path in paths:
        image = read_rgb(path)
        labels = predict_labels(model, eval_resize(image, augment).to(device), image.shape[-2:]).cpu()
        overlay, label_png = out / f"{path.stem}_overlay.png", out / f"{path.stem}_labels.png"
        save_png(draw_segmentation(image, labels, len(class_names), alpha=config.alpha), overlay)
        save_png(labels.to(torch.uint8), label_png)
        counts = torch.bincount(labels.flatten(), minlength=len(class_names))
        present = {
            class_names[c]: round(float(counts[c]) / labels.numel(), 4)
            for c in counts.nonzero().flatten().tolist()
        }
        written.append(
            {"path": str(path), "overlay": str(overlay), "labels": str(label_png), "classes": present}
        )
    runs_with = model.describe() if hasattr(model, "describe") else backend
    return {"images": written, "class_names": class_names, "backend": backend, "runs_with": runs_with}

"""``metaformer segment eval``: mIoU, mAcc, pixel accuracy and per-class IoU of a Semantic FPN checkpoint, on
any backend and precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from metaformer.data.segmentation import LAYOUTS, open_segmentation
from metaformer.deploy.options import DeployOptions, compare_with_fp32, held_out_report, max_drop_option
from metaformer.engine import skeleton
from metaformer.engine.distributed import pick_device
from metaformer.engine.skeleton import seeded_subset
from metaformer.options import option
from metaformer.tasks import command
from metaformer.tasks.dense.data import data_root
from metaformer.tasks.dense.files import check_classes
from metaformer.tasks.dense.options import DenseEvalOptions
from metaformer.tasks.segment.checkpoint import load_segmenter
from metaformer.tasks.segment.deploy import fp32_reference, prepare_segmenter
from metaformer.tasks.segment.train import DATA_HELP, SHAPES_SEGMENT, SegmentationTask


@dataclass(frozen=True, kw_only=True)
class SegmentEvalConfig(DeployOptions, DenseEvalOptions):
    """Evaluate a Semantic FPN checkpoint on a split (default: the shapes set's val split), on any
    backend and precision (bf16 and int8 are compared with fp32 on the same images)."""

    TASK: ClassVar[str] = "segment"
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "data": {"help": DATA_HELP},
        "split": {"help": "split to evaluate (validation for ADE20K, else val)"},
    }

    layout: str = option("auto", "data layout", choices=LAYOUTS)
    classes: str | None = option(None, "class names, one a line (default: the layout's)", metavar="FILE")
    max_drop: float = max_drop_option("mIoU")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_deploy()


@command(
    "eval",
    SegmentEvalConfig,
    "mIoU, per-class IoU and pixel accuracy of a checkpoint",
    "mIoU, mAcc, pixel accuracy and per-class IoU from one confusion matrix over the split.",
)
def evaluate_segmenter(config: SegmentEvalConfig) -> dict[str, Any]:
    """mIoU, mAcc, pixel accuracy and per-class IoU of a checkpoint, with the eval resize it trained with."""
    model, class_names, augment = load_segmenter(config.checkpoint)
    root = data_root(config.data, SHAPES_SEGMENT)
    dataset = open_segmentation(
        root, config.split, layout=config.layout, classes=config.classes, train=False, augment=augment
    )
    check_classes(config.checkpoint, class_names, dataset.class_names, str(root))
    subset = seeded_subset(dataset, config.limit, 1)
    device = pick_device(config.device)
    model = model.to(device)
    runner, backend = prepare_segmenter(
        model, config, checkpoint=config.checkpoint, augment=augment, class_names=class_names, device=device,
        img_size=tuple(subset[0][0].shape[-2:]), images=len(subset), shapes=SHAPES_SEGMENT,  # type: ignore[arg-type]
    )  # fmt: skip
    reference = fp32_reference(model, device) if config.precision != "fp32" else None
    task = SegmentationTask(class_names, augment, reference=reference)
    metrics, seconds = skeleton.evaluate_dataset(
        task, runner, subset, device=device, num_workers=config.num_workers, progress=config.progress
    )
    result = {
        "checkpoint": str(config.checkpoint),
        "data": str(root),
        "images": len(subset),  # type: ignore[arg-type]
        "backend": backend,
        "precision": config.precision,
        "runs_with": runner.describe() if hasattr(runner, "describe") else backend,
        **held_out_report(runner),
        "seconds": seconds,
        **metrics,
        "per_class_IoU": task.per_class_iou,
    }
    if reference is not None:
        fp32, agreement = task.compared["fp32_mIoU"], task.compared["agreement"]
        result["fp32_mIoU"] = fp32
        result.update(
            compare_with_fp32(
                "mIoU",
                100.0 * metrics["mIoU"],
                100.0 * fp32,
                100.0 * agreement,
                precision=config.precision,
                max_drop=config.max_drop,
            )  # fmt: skip
        )
    return result

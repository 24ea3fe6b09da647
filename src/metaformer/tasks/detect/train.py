"""Training a detector: the task (summed torchvision losses; COCO bbox / segm AP for eval), the recipes,
the training config, the data and the schedule, and ``train_detector``, which hands them to the shared
skeleton (``engine.skeleton``). The models are in ``detect.model``, the COCO metrics in ``detect.coco_eval``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from metaformer.data.coco import (
    CocoDetection,
    coco_split,
    collate_detection,
    read_coco_json,
)
from metaformer.data.shapes import ShapesConfig
from metaformer.engine import skeleton
from metaformer.engine.distributed import DistInfo, broadcast_object
from metaformer.engine.loop import create_optimizer
from metaformer.engine.skeleton import TrainingParts, TrainingSpec
from metaformer.errors import ConfigError, DataError
from metaformer.options import AT_LEAST_1, PROBABILITY, option
from metaformer.tasks import command
from metaformer.tasks.dense.data import data_root, shapes_first
from metaformer.tasks.dense.options import DenseRunOptions
from metaformer.tasks.detect.coco_eval import coco_evaluate, coco_ground_truth, to_coco_results
from metaformer.tasks.detect.model import (
    ARCHS,
    DEFAULT_ANCHOR_SIZES,
    DetectorConfig,
    create_detector,
    save_detector,
)


# --------------------------------------------------------------------------- the task for engine.loop.fit
class DetectionTask:
    """Summed torchvision detection losses for training; COCO AP (bbox, and segm for Mask R-CNN) for eval."""

    primary_metric = "bbox_AP"

    def __init__(self, ground_truth: Any, class_names: Sequence[str], cat_ids: Sequence[int], *, masks: bool):
        self.ground_truth = ground_truth
        self.class_names = list(class_names)
        self.cat_ids = list(cat_ids)
        self.iou_types = ("bbox", "segm") if masks else ("bbox",)
        self.results: list[dict[str, Any]] = []  # COCO results of the last evaluate()

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        images, targets = batch
        losses = model(images, targets)
        return sum(losses.values()), len(images)

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        results, image_ids = [], []
        for images, targets in loader:
            ids = [int(t["image_id"]) for t in targets]
            results.extend(to_coco_results(model(images), ids, self.cat_ids))
            image_ids.extend(ids)
        results, image_ids = _gather_lists(results), _gather_lists(image_ids)
        metrics = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            metrics = coco_evaluate(self.ground_truth, results, iou_types=self.iou_types, image_ids=image_ids)
        self.results = results
        return broadcast_object(metrics)  # type: ignore[return-value]

    def save_weights(self, model: nn.Module, path: Path) -> None:
        save_detector(model, path, class_names=self.class_names, cat_ids=self.cat_ids)


def _gather_lists(items: list[Any]) -> list[Any]:
    """Concatenate every rank's list (rank order); the list itself for a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return items
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


# --------------------------------------------------------------------------- recipes
SHAPES_DETECT = ShapesConfig(num_train=600, num_val=100, img_size=96)

RECIPES: dict[str, dict[str, Any]] = {
    # PAPER.md 5.1: mmdetection 1x schedule, AdamW, batch 2 per GPU x 8 GPUs, 1333x800 inputs.
    "paper": {
        "arch": "retinanet",
        "epochs": 12,
        "batch_size": 2,
        "lr": None,  # 1e-4 for RetinaNet, 2e-4 for Mask R-CNN (the configs' values)
        "weight_decay": 1e-4,
        "sched": "step",
        "lr_steps": (8, 11),
        "warmup_iters": 500,
        "warmup_ratio": 0.001,
        "min_size": 800,
        "max_size": 1333,
        "fpn_channels": 256,
        "head_norm": False,
        "anchor_sizes": DEFAULT_ANCHOR_SIZES,
        "clip_grad": None,
        "train_split": "train2017",
        "val_split": "val2017",
        "eval_every": 1,
        "amp": "off",
        "model_kwargs": {},
    },
    # The synthetic shapes (96 px): small anchors and FPN, GroupNorm head, cosine schedule, trained from
    # scratch in fp32 on a 2-core AVX2 CPU (README "Detection" gives the measured figures). A step's time
    # goes to per-op overhead more than to FLOPs at this size (1-thread CPU ms a step, batch 8: backbone
    # 84 fwd, head 68 fwd, backward 328, optimizer 44 for s12 with FPN 128; 35 / 27 / 120 / 16 with
    # dims 32-256 and FPN 64), so a narrower backbone and FPN cut the step 2.5x, and batch 4 doubles the
    # updates for about 6% more time an image. No layer scale, as for segmentation: from scratch and this
    # short, blocks that start at 1e-5 of the residual learn too slowly. 12-epoch probes, AP50 at epochs
    # 6 / 9 / 12: dims 32-256, batch 8, lr 3e-3: 0.19 / 0.35 / 0.39; batch 4, lr 2e-3: 0.26 / 0.41 / 0.42
    # (3:45 wall, 225 CPU s on one thread); dims 48-384 learned slower (0.24 at epoch 8). Half the blocks,
    # depths 1-1-3-1, cut a step by a third at this size and learned as fast per step. Most of a step is
    # now the head's and FPN's convolutions (the 12x12 level's 3x3 convs alone ~9 ms of ~80), so fewer
    # levels or blocks buy little more. 18 epochs: AP50 0.559 and 0.553 (seeds 1, 2, one thread each);
    # 20 epochs reached 0.569; 15 reached 0.459. The same recipe at batch 8, lr 4e-3, 24 epochs (as fast
    # a wall clock): 0.506. The README's "The demo runs" has the timed runs.
    "shapes": {
        "arch": "retinanet",
        "epochs": 18,
        "batch_size": 4,
        "lr": 2e-3,
        "weight_decay": 1e-4,
        "sched": "cosine",
        "lr_steps": (),
        "warmup_iters": 200,
        "warmup_ratio": 0.001,
        "min_size": SHAPES_DETECT.img_size,
        "max_size": SHAPES_DETECT.img_size,
        "fpn_channels": 64,
        "head_norm": True,
        "anchor_sizes": (16, 32, 64, 128, 256),
        "clip_grad": 10.0,
        "train_split": "train",
        "val_split": "val",
        "eval_every": 6,
        "amp": "off",
        "model_kwargs": {"depths": (1, 1, 3, 1), "dims": (32, 64, 160, 256), "layer_scale_init": None},
    },
}
RECIPE_FIELDS = tuple(RECIPES["paper"])
PAPER_LR = {"retinanet": 1e-4, "maskrcnn": 2e-4}
SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class DetectTrainConfig(DenseRunOptions):
    """A detection training run. None fields come from the recipe: ``paper`` (default with ``data``) or
    ``shapes`` (default without, on the generated shapes set). ``lr`` is used as given (not scaled by the
    batch); the paper's values are for 8 processes x 2 images."""

    TASK: ClassVar[str] = "detect"
    RECIPES: ClassVar[Mapping[str, Mapping[str, Any]]] = RECIPES
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        **DenseRunOptions.FLAG_OVERRIDES,
        "data": {
            "help": "COCO layout: DIR/annotations/instances_SPLIT.json and images in DIR/SPLIT or "
            "DIR/images/SPLIT (default: the generated shapes set)"
        },
        "eval_every": {"help": "validate every N epochs and the last (paper 1, shapes 6)"},
    }

    arch: str | None = option(None, "detector (default retinanet)", choices=ARCHS)
    train_split: str | None = option(None, "train split (train2017 with --data)", metavar="NAME")
    val_split: str | None = option(None, "validation split (val2017 with --data)", metavar="NAME")
    sched: str | None = option(None, "lr schedule (paper: step)", choices=SCHEDULES)
    lr_steps: tuple[int, ...] | None = option(
        None, "step decay epochs (paper 8 11)", metavar="EPOCH", check=AT_LEAST_1
    )
    warmup_ratio: float | None = option(
        None, "warmup starts at lr x F (paper 0.001)", metavar="F", check=PROBABILITY
    )
    min_size: int | None = option(
        None, "shorter side after resizing (paper 800)", metavar="PX", check=AT_LEAST_1
    )
    max_size: int | None = option(None, "longer side limit (paper 1333)", metavar="PX", check=AT_LEAST_1)
    fpn_channels: int | None = option(None, "FPN width (paper 256)", metavar="C", check=AT_LEAST_1)
    head_norm: bool | None = option(None, "GroupNorm in the RetinaNet head convs (paper: off)")
    anchor_sizes: tuple[int, ...] | None = option(
        None, "base anchor per level (32..512)", metavar="PX", nargs=5, check=AT_LEAST_1
    )

    def __post_init__(self) -> None:
        if self.arch is not None and self.arch not in ARCHS:
            raise ConfigError(f"unknown detector '{self.arch}'; choose one of {', '.join(ARCHS)}")
        if self.sched is not None and self.sched not in SCHEDULES:
            raise ConfigError(f"unknown schedule '{self.sched}'; choose one of {', '.join(SCHEDULES)}")
        super().__post_init__()

    def resolve(self, world_size: int = 1) -> DetectTrainConfig:
        """A copy with every recipe field filled in (the lr is not scaled by ``world_size``)."""
        filled = self.recipe_filled(RECIPE_FIELDS)
        if filled["lr"] is None:
            filled["lr"] = PAPER_LR[filled["arch"]]
        resolved = self.resolved_with(filled)
        resolved.detector_config(num_classes=1)  # its checks (min_size <= max_size...) fail here, before data
        return resolved

    def detector_config(self, num_classes: int) -> DetectorConfig:
        return DetectorConfig(
            num_classes=num_classes,
            arch=str(self.arch),
            backbone=self.model,
            backbone_overrides=dict(self.model_kwargs),
            frozen_stages=self.frozen_stages,
            fpn_channels=int(self.fpn_channels),
            head_norm=bool(self.head_norm),
            min_size=int(self.min_size),
            max_size=int(self.max_size),
            anchor_sizes=tuple(self.anchor_sizes),
        )


# --------------------------------------------------------------------------- data
def detection_splits(
    data: str | None, train_split: str, val_split: str, *, masks: bool
) -> tuple[CocoDetection, CocoDetection, Path]:
    """(train set, val set, val annotation file) of a COCO-layout folder (or the shapes set)."""
    root = Path(data_root(data, SHAPES_DETECT))
    train_images, train_ann = coco_split(root, train_split)
    val_images, val_ann = coco_split(root, val_split)
    train = CocoDetection(train_images, train_ann, masks=masks, train=True, drop_empty=True)
    val = CocoDetection(val_images, val_ann, masks=False)
    if train.class_names != val.class_names:
        raise DataError(
            f"the train and val annotation files have different categories ({len(train.class_names)} vs "
            f"{len(val.class_names)}); use one category list for both"
        )
    return train, val, val_ann


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    sched: str,
    lr: float,
    total_updates: int,
    updates_per_epoch: int,
    lr_steps: Sequence[int] = (),
    warmup_iters: int = 0,
    warmup_ratio: float = 0.001,
) -> Any:
    """A per-iteration timm schedule: mmdetection's step decay (x0.1 at ``lr_steps`` epochs) or cosine, both
    after a linear warmup from ``lr * warmup_ratio`` over ``warmup_iters`` updates."""
    from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

    warmup = {"warmup_t": warmup_iters, "warmup_lr_init": lr * warmup_ratio, "t_in_epochs": False}
    if sched == "step":
        return MultiStepLRScheduler(
            optimizer, decay_t=[int(s) * updates_per_epoch for s in lr_steps], decay_rate=0.1, **warmup
        )
    return CosineLRScheduler(optimizer, t_initial=total_updates, lr_min=0.0, **warmup)


# --------------------------------------------------------------------------- train
@command(
    "train",
    DetectTrainConfig,
    "train a detector",
    "Train RetinaNet or Mask R-CNN. Flags left out come from --recipe (paper: the "
    "PoolFormer COCO 1x settings, default with --data; shapes: the CPU demo on the generated "
    "shapes). Under `torchrun --nproc_per_node=N -m metaformer detect train` it trains "
    "data-parallel.",
)
def train_detector(config: DetectTrainConfig) -> dict[str, Any]:
    """Train (or resume) a detector and return the run summary (also summary.json). torchrun-aware."""
    return skeleton.train(config, TRAINING)


def _build(config: DetectTrainConfig, info: DistInfo) -> TrainingParts:
    masks = config.arch == "maskrcnn"
    train_set, val_set, val_ann = detection_splits(
        config.data, str(config.train_split), str(config.val_split), masks=masks
    )
    train_loader, val_loader = skeleton.data_loaders(
        config, train_set, val_set, info, collate_fn=collate_detection
    )
    detector = config.detector_config(train_set.num_classes)
    model = create_detector(detector, backbone_checkpoint=config.backbone_weights()).to(info.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer(params, lr=float(config.lr), weight_decay=float(config.weight_decay))
    updates_per_epoch = math.ceil(len(train_loader) / config.accum_steps)
    scheduler = make_scheduler(
        optimizer,
        sched=str(config.sched),
        lr=float(config.lr),
        total_updates=updates_per_epoch * int(config.epochs),
        updates_per_epoch=updates_per_epoch,
        lr_steps=config.lr_steps if config.lr_steps is not None else (),
        warmup_iters=int(config.warmup_iters),
        warmup_ratio=float(config.warmup_ratio),
    )
    task = DetectionTask(
        coco_ground_truth(read_coco_json(val_ann)), train_set.class_names, train_set.cat_ids, masks=masks
    )
    images = len(train_loader.dataset), len(val_loader.dataset)  # type: ignore[arg-type]
    describe = (
        f"{config.arch} {config.model} on {config.data or 'the shapes data set'}: {images[0]} train / "
        f"{images[1]} val images, {train_set.num_classes} classes, recipe '{config.recipe}'"
    )
    summary = {
        "arch": config.arch,
        "num_classes": train_set.num_classes,
        "skipped_boxes": train_set.skipped_boxes + val_set.skipped_boxes,
    }
    loaders = train_loader, val_loader
    record = {"class_names": train_set.class_names}
    return TrainingParts(task, model, optimizer, scheduler, *loaders, describe, summary, record)


def _finish(config: DetectTrainConfig, summary: dict[str, Any], parts: TrainingParts) -> str:
    last, best = summary.get("last") or {}, summary["best_bbox_AP"]
    return (
        f"bbox AP {last.get('bbox_AP', float('nan')):.3f} / AP50 {last.get('bbox_AP50', float('nan')):.3f} "
        f"(last epoch), best AP {'n/a' if best is None else f'{best:.3f}'} at epoch {summary['best_epoch']}"
    )


TRAINING = TrainingSpec(
    "detect",
    _build,
    _finish,
    "generated:shapes",
    prepare=shapes_first(SHAPES_DETECT),
    may_differ=("class_names",),
)

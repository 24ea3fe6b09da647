"""Training a Semantic FPN (Panoptic FPN's semantic branch, PAPER.md 6.1): the task (cross entropy; mIoU
from one confusion matrix accumulated over the whole data set, never averaged per batch), the recipes, the
training config, the data and the poly schedule, and ``train_segmenter``, which hands them to the shared
skeleton (``engine.skeleton``). The model is in ``segment.model``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metaformer.data.segmentation import (
    IGNORE_INDEX,
    LAYOUTS,
    SegAugment,
    SegmentationDataset,
    open_segmentation,
)
from metaformer.data.shapes import ShapesConfig
from metaformer.engine import skeleton
from metaformer.engine.distributed import DistInfo, all_reduce_sum
from metaformer.engine.loop import create_optimizer
from metaformer.engine.skeleton import TrainingParts, TrainingSpec
from metaformer.errors import ConfigError
from metaformer.options import AT_LEAST_1, BELOW_ONE, FRACTION, option
from metaformer.tasks import command
from metaformer.tasks.dense.data import data_root, shapes_first
from metaformer.tasks.dense.options import DenseRunOptions
from metaformer.tasks.segment.checkpoint import save_segmenter
from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter, segmentation_loss


# --------------------------------------------------------------------------- metrics
def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(K, K) int64 counts, rows = true class, columns = predicted class, over pixels not ignored."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU, mean class accuracy, pixel accuracy and per-class IoU from a whole-data-set confusion matrix.

    As mmseg: a class absent from both the labels and the predictions has no IoU (None) and is left out
    of the mean; a class only predicted has IoU 0.
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    labelled = conf.sum(1)
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(labelled > 0, tp / labelled.clamp(min=1), torch.full_like(tp, float("nan")))
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    total = conf.sum()
    return {
        "mIoU": float(iou.nanmean()) if (union > 0).any() else 0.0,
        "mAcc": float(acc.nanmean()) if (labelled > 0).any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class_IoU": {
            n: (None if math.isnan(v) else round(v, 6)) for n, v in zip(names, iou.tolist(), strict=True)
        },
    }


# --------------------------------------------------------------------------- the task for engine.loop.fit
class SegmentationTask:
    """Cross entropy (ignore index) for training; mIoU / mAcc / pixel accuracy from one confusion matrix.

    ``reference`` (eval at bf16 or int8): the fp32 model, run on the same images; ``compared`` then
    holds its mIoU and the pixel agreement of the two label maps (at each mask's size)."""

    primary_metric = "mIoU"

    def __init__(
        self,
        class_names: Sequence[str],
        augment: SegAugment,
        *,
        ignore_index: int = IGNORE_INDEX,
        class_weight: Sequence[float] | None = None,
        reference: nn.Module | None = None,
    ):
        self.class_names = list(class_names)
        self.reference = reference
        self.compared: dict[str, float] = {}
        self.num_classes = len(self.class_names)
        self.augment = augment
        self.ignore_index = ignore_index
        if class_weight is not None and len(class_weight) != self.num_classes:
            raise ConfigError(
                f"--class-weight gives {len(class_weight)} weights but the data set has {self.num_classes} "
                f"classes ({', '.join(self.class_names)}); pass one weight per class"
            )
        self.class_weight = None if class_weight is None else torch.tensor(class_weight, dtype=torch.float32)
        self.per_class_iou: dict[str, float | None] = {}  # of the last evaluate()
        self.confusion: torch.Tensor | None = None

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        images, targets = batch
        loss = segmentation_loss(model(images), targets, self.ignore_index, self.class_weight)
        return loss, int(images.shape[0])

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """Whole-image inference; each prediction is resized to its mask's original size before counting."""
        tensors = itertools.chain(model.parameters(), model.buffers())  # a runtime's runner has no parameter
        device = next((t.device for t in tensors), torch.device("cpu"))
        conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum over pixels, pixels
        reference = torch.zeros_like(conf)
        agree = torch.zeros(2, dtype=torch.int64, device=device)  # same label, pixels
        for images, targets in loader:
            for image, target in zip(images, targets, strict=True):
                logits = self._labels_at(model, image, target)
                labelled = int((target != self.ignore_index).sum())
                if labelled:
                    loss = F.cross_entropy(
                        logits, target[None], ignore_index=self.ignore_index, reduction="sum"
                    )
                    totals += torch.stack(
                        [loss.double(), torch.tensor(float(labelled), device=device).double()]
                    )
                labels = logits.argmax(1)[0]
                conf += confusion_matrix(labels, target, self.num_classes, self.ignore_index)
                if self.reference is not None:
                    fp32 = self._labels_at(self.reference, image, target).argmax(1)[0]
                    reference += confusion_matrix(fp32, target, self.num_classes, self.ignore_index)
                    agree += torch.tensor([int((fp32 == labels).sum()), labels.numel()], device=device)
        conf = all_reduce_sum(conf).cpu()
        totals = all_reduce_sum(totals).cpu()
        if self.reference is not None:
            same, pixels = all_reduce_sum(agree).tolist()
            fp32_miou = segmentation_metrics(all_reduce_sum(reference).cpu())["mIoU"]
            self.compared = {"fp32_mIoU": fp32_miou, "agreement": same / max(pixels, 1)}
        self.confusion = conf
        metrics = segmentation_metrics(conf, self.class_names)
        self.per_class_iou = metrics.pop("per_class_IoU")
        return {**metrics, "loss": float(totals[0] / max(float(totals[1]), 1.0))}

    @staticmethod
    def _labels_at(model: nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits of one image at its mask's size."""
        logits = model(image[None]).float().to(target.device)
        return F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)

    def save_weights(self, model: nn.Module, path: Path) -> None:
        save_segmenter(model, path, class_names=self.class_names, augment=self.augment)


# --------------------------------------------------------------------------- recipes
# The segmentation variant: larger shapes, at most three an image (more labelled pixels per class).
SHAPES_SEGMENT = ShapesConfig(
    num_train=1200, num_val=100, img_size=64, min_size=0.35, max_size=0.7, max_objects=3
)

RECIPES: dict[str, dict[str, Any]] = {
    # PAPER.md 6.1: 40k iterations at batch 32 (8 processes x 4), AdamW 2e-4, poly 0.9, 512 crops.
    "paper": {
        "iters": 40000,
        "epochs": None,
        "batch_size": 4,
        "lr": 2e-4,
        "weight_decay": 1e-4,
        "warmup_iters": 0,
        "scale": (2048, 512),
        "ratio_range": (0.5, 2.0),
        "crop_size": 512,
        "cat_max_ratio": 0.75,
        "photometric": True,
        "eval_iters": 4000,
        "clip_grad": None,
        "fpn_channels": 256,
        "head_channels": 128,
        "dropout": 0.1,
        "class_weight": None,
        "amp": "off",
        "model_kwargs": {},
    },
    # The synthetic shapes (64 px), trained from scratch in fp32 on a 2-core AVX2 CPU (bf16 is emulated
    # there: 12x slower than fp32). FPN 64 with the paper's 128-wide head (a 64-wide head cost mIoU 0.08),
    # no rescaling or colour jitter (the generator already varies size and colour), a high lr, no dropout
    # and no layer scale: from scratch and this short, blocks that start at 1e-5 of the residual learn too
    # slowly. The step's cost is mostly outside the blocks (stem, FPN, head, optimizer): 2 threads, all
    # blocks at batch 4 cost 50 ms a step, depths 1-1-3-1 36 ms, 1-1-3-1 at batch 8 with a 64-wide head
    # 39 ms. So the recipe takes half the blocks and batch 8 and spends the saving on 24 epochs instead
    # of 9 (0.52 then). A warmup of 3 epochs (450 steps) instead of 100 steps: with the short one, one
    # trajectory in four got stuck (0.474; the others 0.553-0.604). With it: 0.617 / 0.611 / 0.578
    # (seed 0 on two threads; seeds 1, 2 on one). README "The demo runs" has the timed runs.
    "shapes": {
        "iters": None,
        "epochs": 24,
        "batch_size": 8,
        "lr": 8e-3,
        "weight_decay": 1e-4,
        "warmup_iters": 450,
        "scale": (4 * SHAPES_SEGMENT.img_size, SHAPES_SEGMENT.img_size),
        "ratio_range": (1.0, 1.0),
        "crop_size": SHAPES_SEGMENT.img_size,
        "cat_max_ratio": 0.75,
        "photometric": False,
        "eval_iters": 900,
        "clip_grad": 10.0,
        "fpn_channels": 64,
        "head_channels": 128,
        "dropout": 0.0,
        "class_weight": None,
        "amp": "off",
        "model_kwargs": {"depths": (1, 1, 3, 1), "dims": (32, 64, 160, 256), "layer_scale_init": None},
    },
}
RECIPE_FIELDS = tuple(RECIPES["paper"])
DATA_HELP = (
    "ADE20K layout (DIR/images/SPLIT, DIR/annotations/SPLIT) or images/ + masks/ + classes.txt "
    "(default: the generated shapes set)"
)


@dataclass(frozen=True)
class SegmentTrainConfig(DenseRunOptions):
    """A segmentation training run. None fields come from the recipe: ``paper`` (default with ``data``) or
    ``shapes`` (default without). ``iters`` (total optimizer steps, rounded up to whole epochs) wins over
    ``epochs``; ``eval_iters`` likewise sets how often to validate. ``lr`` is used as given."""

    TASK: ClassVar[str] = "segment"
    RECIPES: ClassVar[Mapping[str, Mapping[str, Any]]] = RECIPES
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        **DenseRunOptions.FLAG_OVERRIDES,
        "data": {"help": DATA_HELP},
        "eval_every": {"help": "validate every N epochs (overrides --eval-iters)"},
    }

    layout: str = option("auto", "data layout", choices=LAYOUTS)
    classes: str | None = option(None, "class names, one a line (default: the layout's)", metavar="FILE")
    train_split: str | None = option(None, "train split (training for ADE20K, else train)", metavar="NAME")
    val_split: str | None = option(None, "validation split (validation for ADE20K, else val)", metavar="NAME")
    iters: int | None = option(
        None, "optimizer steps, rounded up to epochs (paper 40000)", metavar="N", check=AT_LEAST_1
    )
    power: float = option(0.9, "poly schedule power (0.9)", metavar="P", check={"low": 0})
    scale: tuple[int, int] | None = option(
        None, "resize scale (2048 512)", metavar=("LONG", "SHORT"), check=AT_LEAST_1
    )
    ratio_range: tuple[float, float] | None = option(
        None, "rescale ratios (0.5 2)", metavar=("LOW", "HIGH"), check={"low": 0, "low_open": True}
    )
    crop_size: int | None = option(None, "training crop (paper 512)", metavar="PX", check=AT_LEAST_1)
    cat_max_ratio: float | None = option(
        None,
        "max share of one class in a crop (0.75)",
        metavar="F",
        check=FRACTION,
    )
    photometric: bool | None = option(None, "photometric distortion (on)")
    eval_iters: int | None = option(
        None, "validate every N steps (paper 4000)", metavar="N", check=AT_LEAST_1
    )
    fpn_channels: int | None = option(None, "FPN width (paper 256, shapes 64)", metavar="C", check=AT_LEAST_1)
    head_channels: int | None = option(
        None, "head width (paper and shapes 128)", metavar="C", check=AT_LEAST_1
    )
    dropout: float | None = option(
        None, "dropout before the classifier (paper 0.1, shapes 0)", metavar="P",
        check=BELOW_ONE,
    )  # fmt: skip
    class_weight: tuple[float, ...] | None = option(
        None, "cross-entropy weight per class, in class order (default: none, as the paper)", metavar="W",
        check={},
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.class_weight is not None:
            object.__setattr__(self, "class_weight", tuple(float(w) for w in self.class_weight))
            if not self.class_weight or min(self.class_weight) < 0 or max(self.class_weight) <= 0:
                raise ConfigError(
                    "class weights must be non-negative with at least one positive, "
                    f"got {list(self.class_weight)}"
                )

    def resolve(self, world_size: int = 1) -> SegmentTrainConfig:
        """A copy with every recipe field filled in (the lr is not scaled by ``world_size``)."""
        filled = self.recipe_filled(RECIPE_FIELDS)
        if self.epochs is not None and self.iters is None:
            filled["iters"] = None  # an explicit --epochs replaces the recipe's iteration count
        resolved = self.resolved_with(filled)
        resolved.augment()  # the augmentation's and the model's own checks fail here, before any data is read
        resolved.segmenter_config(num_classes=1)
        return resolved

    def augment(self) -> SegAugment:
        crop = int(self.crop_size)  # resolved configs only: no recipe field is None
        return SegAugment(
            scale=tuple(self.scale),  # type: ignore[arg-type]
            ratio_range=tuple(self.ratio_range),  # type: ignore[arg-type]
            crop_size=(crop, crop),
            cat_max_ratio=float(self.cat_max_ratio if self.cat_max_ratio is not None else 0.75),
            photometric=bool(self.photometric),
        )

    def segmenter_config(self, num_classes: int) -> SegmenterConfig:
        return SegmenterConfig(
            num_classes=num_classes,
            backbone=self.model,
            backbone_overrides=dict(self.model_kwargs),
            frozen_stages=self.frozen_stages,
            fpn_channels=int(self.fpn_channels),
            head_channels=int(self.head_channels),
            dropout=float(self.dropout if self.dropout is not None else 0.1),
        )


def segmentation_splits(config: SegmentTrainConfig) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) of the data folder, or of the shapes set when ``data`` is None."""
    root = data_root(config.data, SHAPES_SEGMENT)
    augment = config.augment()
    kwargs = {"layout": config.layout, "classes": config.classes, "augment": augment}
    train = open_segmentation(root, config.train_split, train=True, **kwargs)  # type: ignore[arg-type]
    val = open_segmentation(root, config.val_split, train=False, **kwargs)  # type: ignore[arg-type]
    return train, val


# --------------------------------------------------------------------------- train
@command(
    "train",
    SegmentTrainConfig,
    "train a Semantic FPN",
    "Train Semantic FPN. Flags left out come from --recipe (paper: the PoolFormer ADE20K "
    "settings, default with --data; shapes: the CPU demo on the generated shapes). Under `torchrun "
    "--nproc_per_node=N -m metaformer segment train` it trains data-parallel.",
)
def train_segmenter(config: SegmentTrainConfig) -> dict[str, Any]:
    """Train (or resume) a Semantic FPN and return the run summary (also summary.json). torchrun-aware."""
    return skeleton.train(config, TRAINING)


def _build(config: SegmentTrainConfig, info: DistInfo) -> TrainingParts:
    train_set, val_set = segmentation_splits(config)
    train_loader, val_loader = skeleton.data_loaders(config, train_set, val_set, info, val_batch_size=1)
    updates_per_epoch = math.ceil(len(train_loader) / config.accum_steps)
    epochs = int(config.epochs)
    if config.iters is not None:
        epochs = math.ceil(config.iters / updates_per_epoch)
    eval_every = config.eval_every or (
        max(1, round(config.eval_iters / updates_per_epoch)) if config.eval_iters else 1
    )
    model = create_segmenter(
        config.segmenter_config(train_set.num_classes), backbone_checkpoint=config.backbone_weights()
    )
    if info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the paper's SyncBN
    model = model.to(info.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer(params, lr=float(config.lr), weight_decay=float(config.weight_decay))
    scheduler = poly_scheduler(
        optimizer,
        total_updates=epochs * updates_per_epoch,
        power=config.power,
        warmup_iters=int(config.warmup_iters),
        lr=float(config.lr),
    )
    task = SegmentationTask(train_set.class_names, config.augment(), class_weight=config.class_weight)
    images = len(train_loader.dataset), len(val_loader.dataset)  # type: ignore[arg-type]
    describe = (
        f"Semantic FPN {config.model} on {config.data or 'the shapes data set'}: {images[0]} train / "
        f"{images[1]} val images, {train_set.num_classes} classes, {epochs} epochs x {updates_per_epoch} "
        f"iterations, recipe '{config.recipe}'"
    )
    summary = {"num_classes": train_set.num_classes, "iterations": epochs * updates_per_epoch}
    record = {
        "class_names": train_set.class_names,
        "epochs_run": epochs,
        "iters_run": epochs * updates_per_epoch,
    }
    loaders = train_loader, val_loader
    return TrainingParts(
        task, model, optimizer, scheduler, *loaders, describe, summary, record, epochs, eval_every
    )


def _finish(config: SegmentTrainConfig, summary: dict[str, Any], parts: TrainingParts) -> str:
    summary["per_class_IoU"] = parts.task.per_class_iou  # type: ignore[attr-defined]  # the last evaluation's
    last, best = summary.get("last") or {}, summary["best_mIoU"]
    best_text = "n/a" if best is None else f"{best:.3f}"
    miou = last.get("mIoU", float("nan"))
    return f"mIoU {miou:.3f} (last epoch), best {best_text} at epoch {summary['best_epoch']}"


RESUME_MAY_DIFFER = ("class_names", "epochs_run", "iters_run")  # besides the shared ones (skeleton.py)
TRAINING = TrainingSpec(
    "segment",
    _build,
    _finish,
    "generated:shapes",
    prepare=shapes_first(SHAPES_SEGMENT),
    may_differ=RESUME_MAY_DIFFER,
)


def poly_scheduler(
    optimizer: torch.optim.Optimizer, *, total_updates: int, power: float, warmup_iters: int, lr: float
) -> Any:
    """mmseg's poly schedule per iteration: lr x (1 - t/T)^power down to 0, after an optional warmup."""
    from timm.scheduler import PolyLRScheduler

    return PolyLRScheduler(
        optimizer,
        t_initial=total_updates,
        power=power,
        lr_min=0.0,
        warmup_t=warmup_iters,
        warmup_lr_init=lr * 1e-3 if warmup_iters else 0.0,
        t_in_epochs=False,
    )

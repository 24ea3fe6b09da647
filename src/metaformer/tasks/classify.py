"""Image classification: train, evaluate and predict with any registered MetaFormer.

Two recipes, both built from timm parts (``create_transform``, ``Mixup``, ``SoftTargetCrossEntropy``,
``create_optimizer_v2``, ``create_scheduler_v2``, ``ModelEmaV3``) and run by ``engine.loop.fit``:

- ``paper``: the PoolFormer ImageNet recipe (PAPER.md section 4), the default with ``data=DIR``.
- ``small``: a short recipe for small data sets, the default for the embedded digits (``data=None``).

Every field of ``TrainConfig`` left as None is filled from the recipe by ``TrainConfig.resolve``; the
resolved config is what ``config.json`` records.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, Subset

from metaformer.data.embedded import DIGITS_CLASSES, digits_splits
from metaformer.data.folders import IMG_EXTENSIONS, check_layout, folder_split, folder_splits
from metaformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from metaformer.engine import skeleton
from metaformer.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    pick_device,
)
from metaformer.engine.loop import (
    amp_dtype,
    create_optimizer,
    use_channels_last,
)
from metaformer.engine.skeleton import TrainingParts, TrainingSpec
from metaformer.errors import CheckpointError, ConfigError, DataError, check_choice
from metaformer.inference import BACKENDS, prepare_for_inference
from metaformer.models import create_model, get_variant
from metaformer.options import (
    AMP_MODES,
    AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED_RANGE,
    EvalOptions,
    RunOptions,
    check_fields,
    option,
)
from metaformer.tasks import TaskCommands, command

logger = logging.getLogger(__name__)
COMMANDS = TaskCommands(
    __name__,
    "classify",
    "train, evaluate and run image classifiers",
    "Image classification. `metaformer classify train` with no options trains poolformer_s12 on "
    "the embedded digits data set.",
)

# --------------------------------------------------------------------------- recipes
RECIPES: dict[str, dict[str, Any]] = {
    # PAPER.md section 4 (PoolFormer v1 on ImageNet-1K); drop path and crop_pct come from the model.
    "paper": {
        "epochs": 300,
        "batch_size": 128,
        "lr_base": 1e-3,
        "lr_base_batch": 1024,
        "weight_decay": 0.05,
        "opt": "adamw",
        "opt_eps": 1e-8,
        "opt_betas": (0.9, 0.999),
        "sched": "cosine",
        "sched_on_steps": False,
        "warmup_epochs": 5,
        "warmup_lr": 1e-6,
        "min_lr": 1e-5,
        "label_smoothing": 0.1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "re_prob": 0.25,
        "re_mode": "pixel",
        "scale": (0.08, 1.0),
        "ratio": (3 / 4, 4 / 3),
        "hflip": 0.5,
        "train_interpolation": "random",
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "accum_steps": 1,
        "amp": "auto",
        "seed": 42,
    },
    # Small data sets (the default run on the 32x32 digits): short per-step cosine schedule, light
    # geometric augmentation, no flips (digits are not mirror-symmetric), no mixup, no random erasing.
    "small": {
        "epochs": 12,
        "batch_size": 64,
        "lr_base": 2e-3,
        "lr_base_batch": 64,
        "weight_decay": 0.05,
        "opt": "adamw",
        "opt_eps": 1e-8,
        "opt_betas": (0.9, 0.999),
        "sched": "cosine",
        "sched_on_steps": True,
        "warmup_epochs": 1,
        "warmup_lr": 1e-5,
        "min_lr": 1e-5,
        "label_smoothing": 0.1,
        "mixup": 0.0,
        "cutmix": 0.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
        "auto_augment": "none",
        "re_prob": 0.0,
        "re_mode": "pixel",
        "scale": (0.8, 1.0),
        "ratio": (0.85, 1.18),
        "hflip": 0.0,
        "train_interpolation": "bicubic",
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 1.0,
        "drop_path_rate": 0.0,
        "accum_steps": 1,
        "amp": "off",  # fp32 on every CPU, so the demo gives the same numbers everywhere
        "seed": 0,
    },
}
RECIPE_FIELDS = (
    "epochs",
    "batch_size",
    "lr_base",
    "lr_base_batch",
    "weight_decay",
    "opt",
    "opt_eps",
    "opt_betas",
    "sched",
    "sched_on_steps",
    "warmup_epochs",
    "warmup_lr",
    "min_lr",
    "label_smoothing",
    "mixup",
    "cutmix",
    "mixup_prob",
    "mixup_switch_prob",
    "mixup_mode",
    "auto_augment",
    "re_prob",
    "re_mode",
    "scale",
    "ratio",
    "hflip",
    "train_interpolation",
    "interpolation",
    "mean",
    "std",
    "crop_pct",
    "drop_path_rate",
    "accum_steps",
    "amp",
    "seed",
)
# Options that may change between a run and its --resume, besides the shared ones (skeleton.py). The
# process count may change too (the lr, scaled by the global batch, is still checked: pass --lr to keep
# it); then random streams differ.
RESUME_MAY_DIFFER = ("eval_every", "class_names", "world_size")
BACKEND_HELP = (
    "inference runtime: torch (our fast path), onnxruntime (exported graph, CPU, fp32), or auto: the one "
    "measured faster here (default)"
)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
EMBEDDED_IMG_SIZE = 32
FOLDER_IMG_SIZE = 224


@dataclass(frozen=True)
class TrainConfig(RunOptions):
    """Everything a training run needs; None fields come from the recipe (see ``RECIPES``).

    ``data=None`` trains on the embedded digits. ``lr=None`` scales ``lr_base`` by the global batch
    (batch_size x processes x accum_steps) / ``lr_base_batch``, as the paper does (1e-3 per 1024).
    ``auto_augment="none"`` turns RandAugment off; ``ema_decay``/``clip_grad`` None mean off.
    """

    TASK: ClassVar[str] = "classify"
    RECIPES: ClassVar[Mapping[str, Mapping[str, Any]]] = RECIPES
    DEMO_RECIPE: ClassVar[str] = "small"
    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "model": {"help": "model name (`metaformer models` lists them)"},
        "data": {
            "help": "ImageFolder tree DIR/train/<class>/*, DIR/val/<class>/* (default: the embedded digits)"
        },
        "recipe": {"help": "hyperparameter preset (paper with --data, else small)"},
        "epochs": {"help": "epochs (paper 300, small 12)"},
        "batch_size": {"help": "images per process per step (paper 128, small 64)"},
        "lr": {"help": "peak learning rate (default: lr-base x global batch / lr-base-batch)"},
        "weight_decay": {"help": "AdamW weight decay, not applied to norms, biases, layer scales (0.05)"},
        "amp": {"help": "off, auto, bf16 or fp16 (auto: bf16 where native, else off)", "choices": None,
                "metavar": "MODE"},
        "clip_grad": {"help": "clip the gradient norm (off)"},
        "num_workers": {"help": "data-loading processes (digits 0, folders up to 8)"},
        "limit_train": {"check": POSITIVE},
        "limit_val": {"check": POSITIVE},
        "stop_after_epoch": {"help": "stop (resumably) after epoch N, e.g. to fit a job time limit"},
    }  # fmt: skip

    accum_steps: int | None = option(None, "gradient accumulation steps (1)", metavar="N", check=POSITIVE)
    seed: int | None = option(None, "random seed (paper 42, small 0)", metavar="N", check=SEED_RANGE)
    eval_every: int | None = option(
        1, "validate every N epochs (and the last)", metavar="N", check=AT_LEAST_1
    )
    lr_base: float | None = option(
        None,
        "lr at the reference batch (paper 1e-3 per 1024, small 2e-3 per 64)",
        metavar="LR",
        check=POSITIVE,
    )
    lr_base_batch: int | None = option(
        None, "reference global batch for lr scaling", metavar="N", check=POSITIVE
    )
    opt: str | None = option(
        None, "timm optimizer name (adamw; lamb for CAFormer in the baselines paper)", metavar="NAME"
    )
    opt_eps: float | None = option(None, "optimizer epsilon (1e-8)", metavar="EPS", check=NON_NEGATIVE)
    opt_betas: tuple[float, float] | None = option(
        None,
        "optimizer betas (0.9 0.999)",
        metavar=("B1", "B2"),
        check={"low": 0, "high": 1, "high_open": True},
    )
    sched: str | None = option(None, "timm scheduler name (cosine)", metavar="NAME")
    sched_on_steps: bool | None = option(
        None, "update the lr every optimizer step instead of every epoch (paper: per epoch; small: per step)"
    )
    warmup_epochs: int | None = option(
        None, "linear warmup epochs (paper 5, small 1)", metavar="N", check=NON_NEGATIVE
    )
    warmup_lr: float | None = option(
        None, "lr at the start of warmup (paper 1e-6)", metavar="LR", check=NON_NEGATIVE
    )
    min_lr: float | None = option(None, "cosine floor (1e-5)", metavar="LR", check=NON_NEGATIVE)
    label_smoothing: float | None = option(None, "label smoothing (0.1)", metavar="P", check=PROBABILITY)
    mixup: float | None = option(
        None, "mixup alpha, 0 = off (paper 0.8, small 0)", metavar="ALPHA", check=NON_NEGATIVE
    )
    cutmix: float | None = option(
        None, "cutmix alpha, 0 = off (paper 1.0, small 0)", metavar="ALPHA", check=NON_NEGATIVE
    )
    mixup_prob: float | None = option(
        None, "probability of mixing a batch (1.0)", metavar="P", check=PROBABILITY
    )
    mixup_switch_prob: float | None = option(
        None, "probability of cutmix instead of mixup (0.5)", metavar="P", check=PROBABILITY
    )
    mixup_mode: str | None = option(None, "batch, pair or elem (batch)", metavar="MODE")
    auto_augment: str | None = option(
        None, "timm RandAugment string, or 'none' (paper rand-m9-mstd0.5-inc1)", metavar="POLICY"
    )
    re_prob: float | None = option(
        None, "random erasing probability (paper 0.25, small 0)", metavar="P", check=PROBABILITY
    )
    re_mode: str | None = option(None, "random erasing fill (pixel)", metavar="MODE")
    scale: tuple[float, float] | None = option(
        None,
        "random-resized-crop area range (paper 0.08 1, small 0.8 1)",
        metavar=("LOW", "HIGH"),
        check=POSITIVE,
    )
    ratio: tuple[float, float] | None = option(
        None, "random-resized-crop aspect range (paper 0.75 1.33)", metavar=("LOW", "HIGH"), check=POSITIVE
    )
    hflip: float | None = option(
        None, "horizontal flip probability (paper 0.5, small 0)", metavar="P", check=PROBABILITY
    )
    train_interpolation: str | None = option(
        None, "bilinear, bicubic or random (paper random)", metavar="MODE"
    )
    interpolation: str | None = option(None, "eval resize interpolation (bicubic)", metavar="MODE")
    mean: tuple[float, float, float] | None = option(
        None, "normalisation mean (ImageNet)", metavar=("R", "G", "B"), check={}
    )
    std: tuple[float, float, float] | None = option(
        None, "normalisation std (ImageNet)", metavar=("R", "G", "B"), check=POSITIVE
    )
    img_size: int | None = option(
        None, "input size (embedded digits 32, folders 224)", metavar="PX", check=POSITIVE
    )
    crop_pct: float | None = option(
        None, "eval centre-crop fraction (paper 0.9 for S, 0.95 for M; small 1.0)", metavar="F",
        check={"low": 0, "high": 1, "low_open": True},
    )  # fmt: skip
    drop_path_rate: float | None = option(
        None, "stochastic depth (paper: per model, S12 0.1; small 0)", metavar="P",
        check={"low": 0, "high": 1, "high_open": True},
    )  # fmt: skip
    head_dropout: float | None = option(
        None,
        "classifier dropout (0; CAFormer-S36+ in the paper recipe 0.4-0.5)",
        metavar="P",
        check=PROBABILITY,
    )
    ema_decay: float | None = option(
        None, "keep a timm ModelEmaV3 with this decay, e.g. 0.9999 (off)", metavar="D",
        check={"low": 0, "high": 1, "low_open": True, "high_open": True},
    )  # fmt: skip
    init_checkpoint: str | None = option(
        None,
        "start from these weights (official, timm or metaformer; another class count re-initialises only "
        "the classifier)",
        metavar="PATH",
    )
    pretrained: bool = option(False, "start from the released ImageNet weights")
    verify_images: bool = option(
        True, "skip opening every image up front", flag="--no-verify-images", negate=True
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label_smoothing is not None and self.label_smoothing >= 1.0:
            raise ConfigError(f"label_smoothing must be below 1, got {self.label_smoothing}")
        for name in ("interpolation", "train_interpolation"):
            value = getattr(self, name)
            if value is not None:
                check_choice(name, value, INTERPOLATIONS)
        for name in ("scale", "ratio"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1]):
                raise ConfigError(f"{name} must be two numbers 0 < low <= high, got {value}")
        if self.mixup_mode is not None and self.mixup_mode not in ("batch", "pair", "elem"):
            raise ConfigError(f"mixup_mode must be batch, pair or elem, got '{self.mixup_mode}'")
        if self.pretrained and self.init_checkpoint is not None:
            raise ConfigError("pass either --pretrained or --init-checkpoint, not both")

    def resolve(self, world_size: int = 1) -> TrainConfig:
        """A copy with every recipe field filled in, the lr scaled, and data-dependent defaults set."""
        recipe = self.recipe_name
        values = dict(RECIPES[recipe])
        variant = get_variant(self.model)
        values.setdefault("drop_path_rate", variant.drop_path_rate)
        values.setdefault("crop_pct", _default_crop_pct(self.model))
        filled = self.recipe_values(RECIPE_FIELDS, values)
        global_batch = filled["batch_size"] * world_size * filled["accum_steps"]
        lr = self.lr if self.lr is not None else filled["lr_base"] * global_batch / filled["lr_base_batch"]
        head_dropout = self.head_dropout
        if head_dropout is None:
            head_dropout = (
                float(variant.train_overrides.get("head_dropout", 0.0)) if recipe == "paper" else 0.0
            )
        img_size = self.img_size
        if img_size is None:
            img_size = EMBEDDED_IMG_SIZE if self.data is None else FOLDER_IMG_SIZE
        workers = self.num_workers
        if workers is None:
            workers = 0 if self.data is None else min(8, max(1, (os.cpu_count() or 2) - 1))
        return dataclasses.replace(
            self,
            recipe=recipe,
            lr=lr,
            head_dropout=head_dropout,
            img_size=img_size,
            num_workers=workers,
            **filled,
        )


def _default_crop_pct(model: str) -> float:
    """The eval crop of the model's released ImageNet weights (0.9 for S, 0.95 for M PoolFormers)."""
    from metaformer.weights import DEFAULT_TAGS, PRETRAINED

    tag = DEFAULT_TAGS.get(model)
    return PRETRAINED[tag].crop_pct if tag else 0.9


# --------------------------------------------------------------------------- the task
class ClassificationTask:
    """Cross-entropy training (optionally with timm Mixup/CutMix) and top-1/top-5/loss evaluation."""

    primary_metric = "top1"

    def __init__(
        self,
        class_names: Sequence[str],
        *,
        label_smoothing: float = 0.0,
        mixup: Any | None = None,
        metadata: Mapping[str, Any] | None = None,
    ):
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.mixup = mixup
        self.metadata = dict(metadata or {})
        if mixup is not None:
            self.train_loss: nn.Module = SoftTargetCrossEntropy()  # mixup folds label smoothing into targets
        elif label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()
        self.confusion: torch.Tensor | None = None  # (true, predicted) counts of the last evaluate()

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.train_loss(model(images), targets), int(images.shape[0])

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """Loss (plain cross-entropy), top-1 and top-5 in percent over every rank's share of the loader."""
        k = min(5, self.num_classes)
        device = next(iter([*model.parameters(), *model.buffers()])).device  # onnxruntime's has a buffer
        totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-k, count
        confusion = torch.zeros(self.num_classes * self.num_classes, dtype=torch.int64, device=device)
        for images, targets in loader:
            logits = model(images).float()
            top = logits.topk(k, dim=1).indices
            totals[0] += F.cross_entropy(logits, targets, reduction="sum").double()
            totals[1] += (top[:, 0] == targets).sum()
            totals[2] += (top == targets[:, None]).any(dim=1).sum()
            totals[3] += targets.numel()
            confusion += torch.bincount(targets * self.num_classes + top[:, 0], minlength=confusion.numel())
        totals = all_reduce_sum(totals).cpu()
        self.confusion = all_reduce_sum(confusion).cpu().view(self.num_classes, self.num_classes)
        count = max(float(totals[3]), 1.0)
        return {
            "loss": float(totals[0]) / count,
            "top1": 100.0 * float(totals[1]) / count,
            f"top{k}" if k != 5 else "top5": 100.0 * float(totals[2]) / count,
        }

    def save_weights(self, model: nn.Module, path: Path) -> None:
        from metaformer.weights import save_weights

        save_weights(model, path, class_names=self.class_names, metadata=self.metadata)


# --------------------------------------------------------------------------- data
def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``limit`` items (all of them when limit is None or larger)."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    indices = np.random.RandomState(seed).permutation(n)[:limit]
    return Subset(dataset, sorted(int(i) for i in indices))


def _transforms(config: TrainConfig) -> tuple[Any, Any]:
    size = int(config.img_size)  # resolved configs only: no field is None
    aa = None if config.auto_augment in (None, "", "none") else config.auto_augment
    train_tf = train_transform(
        size,
        auto_augment=aa,
        re_prob=config.re_prob,
        re_mode=config.re_mode,
        scale=config.scale,
        ratio=config.ratio,
        hflip=config.hflip,
        interpolation=config.train_interpolation,
        mean=config.mean,
        std=config.std,
    )
    val_tf = eval_transform(
        size,
        crop_pct=config.crop_pct,
        interpolation=config.interpolation,
        mean=config.mean,
        std=config.std,
    )
    return train_tf, val_tf


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, list[str], dict[str, int]]:
    """(train, val, class names, skipped-image counts) for a resolved config."""
    train_tf, val_tf = _transforms(config)
    if config.data is None:
        train, val = digits_splits(config.img_size, train_transform=train_tf, val_transform=val_tf)
        classes = list(DIGITS_CLASSES)
    else:
        train, val = folder_splits(config.data, train_tf, val_tf, verify=config.verify_images)
        classes = list(train.classes)
    skipped = {"train": len(train.skipped), "val": len(val.skipped)}
    seed = config.seed
    return (
        _subset(train, config.limit_train, seed),
        _subset(val, config.limit_val, seed + 1),
        classes,
        skipped,
    )


def _mixup(config: TrainConfig, num_classes: int) -> Any | None:
    if not (config.mixup or config.cutmix):
        return None
    if config.batch_size % 2:
        raise ConfigError(
            f"mixup/cutmix need an even batch size, got {config.batch_size}; change --batch-size"
        )
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=config.mixup,
        cutmix_alpha=config.cutmix,
        prob=config.mixup_prob,
        switch_prob=config.mixup_switch_prob,
        mode=config.mixup_mode,
        label_smoothing=config.label_smoothing,
        num_classes=num_classes,
    )


def _build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    kwargs = dict(config.model_kwargs)
    kwargs.setdefault("img_size", config.img_size)
    kwargs.setdefault("head_dropout", config.head_dropout)
    return create_model(
        config.model,
        num_classes=num_classes,
        drop_path_rate=config.drop_path_rate,
        pretrained=config.pretrained,
        checkpoint_path=config.init_checkpoint,
        **kwargs,
    )


def _preprocessing(config: TrainConfig) -> dict[str, Any]:
    """The eval transform stored with the weights, so eval/predict reproduce it."""
    return {
        "input_size": [3, config.img_size, config.img_size],
        "crop_pct": config.crop_pct,
        "interpolation": config.interpolation,
        "mean": list(config.mean),
        "std": list(config.std),
    }


# --------------------------------------------------------------------------- train
@command(
    "train",
    TrainConfig,
    "train or fine-tune a classifier",
    "Train a classifier. Flags left out come from --recipe (paper: the PoolFormer "
    "ImageNet recipe, default with --data; small: the short recipe the default digits run uses). The "
    "resolved settings are saved as config.json in the run folder. Under `torchrun "
    "--nproc_per_node=N -m metaformer classify train` it trains data-parallel.",
)
def train_classifier(config: TrainConfig) -> dict[str, Any]:
    """Train (or fine-tune, or resume) a classifier and return the run summary (also summary.json).

    Under torchrun every process calls this; rank 0 alone writes the run folder.
    """
    return skeleton.train(config, TRAINING)


def _check_data(config: TrainConfig) -> None:
    if config.data is not None:
        check_layout(config.data)  # before the output folder is created


def _build(config: TrainConfig, info: DistInfo) -> TrainingParts:
    train, val, classes, skipped = build_datasets(config)
    train_loader, val_loader = skeleton.data_loaders(config, train, val, info, subset=False)
    model = _build_model(config, len(classes)).to(info.device)

    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer(
        model,
        opt=config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        eps=config.opt_eps,
        betas=tuple(config.opt_betas),
    )
    updates_per_epoch = math.ceil(len(train_loader) / config.accum_steps)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config.sched,
        num_epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        warmup_lr=config.warmup_lr,
        min_lr=config.min_lr,
        step_on_epochs=not config.sched_on_steps,
        updates_per_epoch=updates_per_epoch,
    )
    metadata = {"task": "classify", "preprocessing": _preprocessing(config), "recipe": config.recipe}
    task = ClassificationTask(
        classes,
        label_smoothing=config.label_smoothing,
        mixup=_mixup(config, len(classes)),
        metadata=metadata,
    )
    describe = (
        f"{config.model} on {config.data or 'the embedded digits'}: {len(train)} train / {len(val)} val "  # type: ignore[arg-type]
        f"images, {len(classes)} classes, recipe '{config.recipe}'"
    )
    summary = {"num_classes": len(classes), "skipped_images": skipped}
    loaders = train_loader, val_loader
    return TrainingParts(
        task, model, optimizer, scheduler, *loaders, describe, summary, {"class_names": classes}
    )


def _finish(config: TrainConfig, summary: dict[str, Any], parts: TrainingParts) -> str:
    best = summary["best_top1"]
    return f"best top-1 {'n/a' if best is None else f'{best:.2f}%'} at epoch {summary['best_epoch']}"


TRAINING = TrainingSpec(
    "classify", _build, _finish, "embedded:digits", _check_data, may_differ=RESUME_MAY_DIFFER
)


# --------------------------------------------------------------------------- loading a classifier
def _checkpoint_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("head.fc.weight", "head.fc.fc2.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def _imagenet_names(num_classes: int) -> list[str]:
    """WordNet ids (the ImageNet folder names) for 1000-class weights, else class indices."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_label_name(i) for i in range(1000)]
    return [str(i) for i in range(num_classes)]


def _readable_names(names: Sequence[str]) -> list[str]:
    """ImageNet wnids -> 'goldfish'; other names unchanged."""
    if len(names) == 1000 and names[0].startswith("n0"):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    return list(names)


def load_classifier(
    checkpoint: str | None = None, model: str | None = None, pretrained: bool = False
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """(eval-mode model, class names, eval preprocessing) from our weights, another checkpoint or a release.

    Our safetensors carry model, config, class names and preprocessing. Official and timm checkpoints
    need ``model``; they use the released weights' eval transform (the paper's: 224, crop 0.9/0.95).
    """
    from metaformer.weights import (
        detect_layout,
        get_weights,
        load_weights,
        model_from_weights,
        read_checkpoint,
        read_metadata,
        to_ours,
    )

    if (checkpoint is None) == (not pretrained):
        raise ConfigError("pass --checkpoint PATH or --pretrained (one of them)")
    if model is not None:
        get_variant(model)
    default_preproc = {
        "input_size": [3, 224, 224],
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    if pretrained:
        if model is None:
            raise ConfigError("--pretrained needs --model NAME")
        net = create_model(model, pretrained=True)
        return net.eval(), _imagenet_names(net.num_classes), get_weights(model).preprocessing()
    path = Path(str(checkpoint))
    if path.is_dir():  # a hub-style folder (save_pretrained, ours or transformers'): config.json says all
        net = model_from_weights(path)
        if model is not None and getattr(net, "model_name", model) != model:
            raise CheckpointError(
                f"'{path}' holds {net.model_name} weights but --model is {model}; drop --model or pass "
                f"--model {net.model_name}"
            )
        if getattr(net, "num_classes", 0) == 0:
            raise CheckpointError(f"'{path}' is a backbone without a classifier; pass a classification model")
        names = getattr(net, "class_names", None) or _imagenet_names(net.num_classes)
        preproc = getattr(net, "preprocessing", None) or default_preproc
        return net.eval(), list(names), dict(preproc)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist; check the path")
    state, raw_meta = read_checkpoint(path)
    if raw_meta.get("format") == "metaformer":
        meta = read_metadata(path)
        if model is not None and meta["model_name"] and meta["model_name"] != model:
            raise CheckpointError(
                f"'{path}' holds {meta['model_name']} weights but --model is {model}; drop --model or pass "
                f"--model {meta['model_name']}"
            )
        net = model_from_weights(path)
        if getattr(net, "num_classes", 0) == 0:
            raise CheckpointError(
                f"'{path}' is a backbone without a classifier; pass a classification checkpoint"
            )
        names = meta.get("class_names") or _imagenet_names(net.num_classes)
        preproc = meta.get("preprocessing")
        if isinstance(preproc, str):
            import json

            preproc = json.loads(preproc)
        return net.eval(), list(names), dict(preproc or default_preproc)
    if model is None:
        raise ConfigError(
            f"'{path}' is not a metaformer weights file, so the model is unknown; pass --model NAME"
        )
    num_classes = _checkpoint_classes(to_ours(state, detect_layout(state, raw_meta)))
    if not num_classes:
        raise CheckpointError(f"'{path}' has no classifier weights; pass a classification checkpoint")
    net = create_model(model, num_classes=num_classes)
    load_weights(net, path)
    preproc = default_preproc
    try:
        record = get_weights(model)
        if record.num_classes == num_classes:
            preproc = record.preprocessing()
    except KeyError:  # no released weights for this model: timm's default eval transform
        pass
    return net.eval(), _imagenet_names(num_classes), dict(preproc)


def _eval_tf(preproc: Mapping[str, Any], img_size: int | None, crop_pct: float | None) -> Any:
    return eval_transform(
        int(img_size if img_size is not None else preproc["input_size"][-1]),
        crop_pct=float(crop_pct if crop_pct is not None else preproc.get("crop_pct", 0.9)),
        interpolation=str(preproc.get("interpolation", "bicubic")),
        mean=preproc.get("mean", IMAGENET_MEAN),
        std=preproc.get("std", IMAGENET_STD),
    )


# --------------------------------------------------------------------------- evaluate
@dataclass(frozen=True, kw_only=True)
class EvalConfig(EvalOptions):
    """Evaluate a checkpoint on DIR/val (or the embedded digits' val split when ``data`` is None)."""

    FLAG_OVERRIDES: ClassVar[dict[str, dict[str, Any]]] = {
        "data": {"help": "folder with val/<class>/* images"},
        "limit": {"check": POSITIVE},
    }

    checkpoint: str | None = option(None, "weights file (metaformer, official or timm)", metavar="PATH")
    model: str | None = option(None, "model name (needed for official/timm checkpoints and --pretrained)")
    pretrained: bool = option(False, "evaluate the released ImageNet weights of --model")
    batch_size: int = option(128, metavar="N", check=POSITIVE)
    img_size: int | None = option(None, "override the eval input size", metavar="PX", check=POSITIVE)
    crop_pct: float | None = option(
        None,
        "override the eval centre-crop fraction",
        metavar="F",
        check={"low": 0, "high": 1, "low_open": True},
    )
    amp: str = option("off", "autocast dtype", choices=AMP_MODES)
    channels_last: bool | None = option(
        None, "channels-last memory format (default: on for CPU, where it is faster; off for CUDA)"
    )
    confusion_png: str | None = option(
        None, "confusion-matrix image (default: next to the checkpoint)", flag="--confusion", metavar="PNG"
    )
    backend: str = option("auto", BACKEND_HELP, choices=BACKENDS)

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        super().__post_init__()
        check_choice("amp", self.amp, AMP_MODES)
        if (self.checkpoint is None) == (not self.pretrained):
            raise ConfigError("pass --checkpoint PATH or --pretrained (one of them)")


@command(
    "eval",
    EvalConfig,
    "top-1/top-5/loss/images-per-s and a confusion matrix",
    "Evaluate a checkpoint on DIR/val (default: the embedded digits' val split). "
    "Official ImageNet checkpoints use the paper's eval transform; metaformer checkpoints the one "
    "they were trained with.",
)
def evaluate_classifier(config: EvalConfig) -> dict[str, Any]:
    """Top-1, top-5, loss and images/s of a checkpoint, plus a confusion-matrix PNG."""
    model, classes, preproc = load_classifier(config.checkpoint, config.model, config.pretrained)
    transform = _eval_tf(preproc, config.img_size, config.crop_pct)
    size = int(config.img_size if config.img_size is not None else preproc["input_size"][-1])
    if config.data is None:
        if len(classes) != len(DIGITS_CLASSES):
            raise CheckpointError(
                f"the checkpoint has {len(classes)} classes but the embedded digits have 10; pass --data DIR "
                "with matching class folders"
            )
        dataset: Dataset = digits_splits(size, val_transform=transform)[1]
        skipped = 0
    else:
        folder = Path(config.data)
        val_dir = folder / "val"
        found = sorted(e.name for e in os.scandir(val_dir) if e.is_dir()) if val_dir.is_dir() else []
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise CheckpointError(
                f"the checkpoint has {len(classes)} classes but '{val_dir}' has {len(found)} class folders, "
                f"{len(unknown)} of them unknown to it (e.g. '{unknown[0]}'); evaluate on matching data or "
                "fine-tune first with `metaformer classify train --init-checkpoint`"
            )
        dataset = folder_split(folder, "val", transform, classes=classes)
        skipped = len(dataset.skipped)  # type: ignore[attr-defined]
    dataset = _subset(dataset, config.limit, 0)
    device = pick_device(config.device)
    model = model.to(device)
    channels_last = use_channels_last(config.channels_last, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    task = ClassificationTask(classes)
    dtype = amp_dtype(config.amp, device)
    runner, backend = prepare_for_inference(
        model,
        backend=config.backend,
        device=device,
        img_size=(size, size),
        batch_size=min(config.batch_size, len(dataset)),  # type: ignore[arg-type]
        amp=dtype,
    )
    metrics, seconds = skeleton.evaluate_dataset(
        task, runner, dataset, device=device, batch_size=config.batch_size, num_workers=config.num_workers,
        progress=config.progress, dtype=dtype, channels_last=channels_last,
    )  # fmt: skip
    png = config.confusion_png
    if png is None:
        png = (
            str(Path(config.checkpoint).with_name(Path(config.checkpoint).stem + "-confusion.png"))
            if config.checkpoint
            else "confusion.png"
        )
    if task.confusion is not None:
        plot_confusion(task.confusion, _readable_names(classes), png)
    return {
        "model": getattr(model, "model_name", config.model),
        "checkpoint": config.checkpoint or f"pretrained:{config.model}",
        "backend": backend,
        "data": config.data or "embedded:digits (val split)",
        "images": len(dataset),  # type: ignore[arg-type]
        "skipped_images": skipped,
        "top1": metrics["top1"],
        "top5": metrics.get("top5", metrics.get(f"top{min(5, len(classes))}")),
        "loss": metrics["loss"],
        "images_per_s": len(dataset) / seconds if seconds > 0 else None,  # type: ignore[arg-type]
        "seconds": seconds,
        "confusion_png": png,
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in preproc.items()},
    }


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """Row-normalised confusion matrix (true class down, predicted across) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metaformer.weights import atomic_write

    counts = matrix.double()
    rates = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    n = len(class_names)
    size = min(4 + 0.35 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if n <= 30:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if counts[i, j] > 0:
                        ax.text(
                            j,
                            i,
                            int(counts[i, j]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = counts.diagonal().sum() / counts.sum().clamp(min=1)
    ax.set_title(f"confusion matrix (top-1 {100 * float(accuracy):.2f}%)")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- predict
@dataclass(frozen=True)
class PredictConfig:
    """Classify one image or every image under a folder; ``cam`` writes a Grad-CAM PNG (single image)."""

    inputs: str = option(
        help="an image file or a folder (searched recursively)", metavar="IMAGE|DIR", positional=True
    )
    checkpoint: str | None = option(None, "weights file (metaformer, official or timm)", metavar="PATH")
    model: str | None = option(None, "model name (needed for official/timm checkpoints and --pretrained)")
    pretrained: bool = option(False, "use the released ImageNet weights of --model")
    topk: int = option(5, "classes to list per image (5)", metavar="K", check=POSITIVE)
    cam: str | None = option(
        None, "write a Grad-CAM heat map of the top class (one image)", metavar="OUT.png"
    )
    batch_size: int = option(32, metavar="N", check=POSITIVE)
    device: str | None = option(None, "cpu, cuda or cuda:N")
    backend: str = option("auto", BACKEND_HELP, choices=BACKENDS)

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        check_fields(self)
        if (self.checkpoint is None) == (not self.pretrained):
            raise ConfigError("pass --checkpoint PATH or --pretrained (one of them)")


def _image_paths(inputs: str) -> list[Path]:
    path = Path(inputs)
    if not path.exists():
        raise DataError(f"'{path}' does not exist; pass an image file or a folder of images")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise DataError(
            f"folder '{path}' holds no image files ({', '.join(IMG_EXTENSIONS)}); pass another path"
        )
    return files


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(
            f"cannot read image '{path}' ({type(err).__name__}); pass a readable image file"
        ) from None


@command(
    "predict",
    PredictConfig,
    "class names and probabilities for images",
)
def predict(config: PredictConfig) -> list[dict[str, Any]]:
    """Top-k class names and probabilities per image; unreadable files in a folder are reported, not fatal."""
    paths = _image_paths(config.inputs)
    if config.cam is not None and len(paths) != 1:
        raise ConfigError(
            f"--cam draws one image, but '{config.inputs}' holds {len(paths)}; pass a single image"
        )
    model, classes, preproc = load_classifier(config.checkpoint, config.model, config.pretrained)
    names = _readable_names(classes)
    transform = _eval_tf(preproc, None, None)
    device = pick_device(config.device)
    model = model.to(device)
    size = int(preproc["input_size"][-1])
    runner, _ = prepare_for_inference(
        model,
        backend=config.backend,
        device=device,
        img_size=(size, size),
        batch_size=min(config.batch_size, len(paths)),
    )
    k = min(config.topk, len(classes))
    results: list[dict[str, Any]] = []
    for start in range(0, len(paths), config.batch_size):
        batch_paths, tensors = [], []
        for path in paths[start : start + config.batch_size]:
            try:
                tensors.append(transform(_open_rgb(path)))
                batch_paths.append(path)
            except DataError as err:
                if len(paths) == 1:
                    raise
                logger.warning("%s", err)
                results.append({"path": str(path), "error": str(err)})
        if not tensors:
            continue
        with torch.no_grad():
            probs = runner(torch.stack(tensors).to(device)).float().softmax(dim=1).cpu()
        values, indices = probs.topk(k, dim=1)
        for path, vals, idxs in zip(batch_paths, values, indices, strict=True):
            results.append(
                {
                    "path": str(path),
                    "predictions": [
                        {"class": names[i], "index": int(i), "probability": float(v)}
                        for v, i in zip(vals.tolist(), idxs.tolist(), strict=True)
                    ],
                }
            )
    if config.cam is not None:
        image = transform(_open_rgb(paths[0]))
        target = results[0]["predictions"][0]["index"]
        heat, stage = grad_cam(model, image.to(device), target)
        write_cam_png(image, heat, preproc, config.cam)
        results[0]["cam"] = {"path": config.cam, "stage": stage, "class": names[target]}
    return results


def _cam_stage(model: nn.Module, size: tuple[int, int]) -> int:
    """The deepest stage whose map is at least 4x4 (7x7 at 224 is the last stage; at 32 it is stage 1)."""
    from metaformer.models.metaformer import stage_grid_sizes

    grids = stage_grid_sizes(size, len(model.stages))
    for index in reversed(range(len(grids))):
        if min(grids[index]) >= 4:
            return index
    return 0


def grad_cam(model: nn.Module, image: torch.Tensor, class_index: int) -> tuple[np.ndarray, int]:
    """Grad-CAM (Selvaraju et al. 2017) of one (C, H, W) image at a stage output: an (H, W) map in [0, 1].

    Channel weights are the spatial mean of d(logit)/d(activation); the map is ReLU(sum of weighted
    activations), upsampled bilinearly to the input size. Returns the map and the stage used.
    """
    stage = _cam_stage(model, tuple(image.shape[-2:]))
    saved: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        saved["act"] = output

    handle = model.stages[stage].register_forward_hook(hook)
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(image.unsqueeze(0).requires_grad_(True))
            logits[0, class_index].backward()
    finally:
        handle.remove()
    act = saved["act"]
    if act.grad is None:
        raise ConfigError(
            "Grad-CAM got no gradient at the chosen stage; this model cannot be explained this way"
        )
    weights = act.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).cpu().numpy(), stage


def write_cam_png(
    image: torch.Tensor, heat: np.ndarray, preproc: Mapping[str, Any], path: str | os.PathLike
) -> None:
    """Overlay the heat map (jet colours, half transparent) on the image the model saw; atomic PNG."""
    from matplotlib import colormaps

    from metaformer.weights import atomic_write

    mean = torch.tensor(preproc.get("mean", IMAGENET_MEAN)).view(3, 1, 1)
    std = torch.tensor(preproc.get("std", IMAGENET_STD)).view(3, 1, 1)
    rgb = (image.detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    colours = colormaps["jet"](heat)[..., :3]
    blend = (0.5 * rgb + 0.5 * colours).clip(0, 1)
    out = Image.fromarray((blend * 255).round().astype(np.uint8))
    if min(out.size) < 224:
        scale = math.ceil(224 / min(out.size))
        out = out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
    with atomic_write(path) as tmp:
        out.save(tmp, format="PNG")


# --------------------------------------------------------------------------- command line
def train_report(summary: Mapping[str, Any]) -> str:
    best = summary["best_top1"]
    best_text = "n/a" if best is None else f"{best:.2f}%"
    return (
        f"best top-1 {best_text} at epoch {summary['best_epoch']} of {summary['epochs']}; "
        f"run folder {summary['output']}"
    )


def eval_report(result: Mapping[str, Any]) -> str:
    lines = [
        f"{result['model']} on {result['data']}: {result['images']} images",
        f"  top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}",
        f"  {result['images_per_s']:.1f} images/s ({result['backend']}); "
        f"confusion matrix: {result['confusion_png']}",
    ]
    if result["skipped_images"]:
        lines.append(f"  skipped {result['skipped_images']} unreadable image(s)")
    return "\n".join(lines)


def predict_report(results: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for item in results:
        if "error" in item:
            lines.append(f"{item['path']}: skipped ({item['error']})")
            continue
        ranked = ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in item["predictions"])
        lines.append(f"{item['path']}: {ranked}")
        if "cam" in item:
            cam = item["cam"]
            lines.append(f"  Grad-CAM for '{cam['class']}' (stage {cam['stage']}): {cam['path']}")
    return "\n".join(lines)

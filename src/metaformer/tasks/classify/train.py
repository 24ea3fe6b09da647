"""Training a classifier: the task (loss, metrics, confusion counts), its data sets and transforms, mixup,
the model, and ``train_classifier``, which hands them to the shared skeleton (``engine.skeleton``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from metaformer.data.embedded import DIGITS_CLASSES
from metaformer.data.fashion_mnist import fashion_mnist_dir, is_fashion_mnist
from metaformer.data.sources import classification_splits
from metaformer.data.transforms import eval_transform, train_transform
from metaformer.engine import skeleton
from metaformer.engine.distributed import DistInfo, all_reduce_sum
from metaformer.engine.loop import create_optimizer
from metaformer.engine.skeleton import TrainingParts, TrainingSpec, seeded_subset
from metaformer.errors import ConfigError
from metaformer.models import create_model
from metaformer.tasks import command
from metaformer.tasks.classify.config import TrainConfig
from metaformer.tasks.classify.recipes import RESUME_MAY_DIFFER, SMALL_DATA_IMAGES

logger = logging.getLogger(__name__)


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
    train, val = classification_splits(
        config.data, img_size=int(config.img_size), train_transform=train_tf, val_transform=val_tf,
        val_split=config.val_split, verify=config.verify_images,
    )  # fmt: skip
    classes = list(DIGITS_CLASSES) if config.data is None else list(train.classes)  # type: ignore[union-attr]
    skipped = {"train": len(train.skipped), "val": len(val.skipped)}
    seed = config.seed
    return (
        seeded_subset(train, config.limit_train, seed),  # type: ignore[arg-type]
        seeded_subset(val, config.limit_val, seed + 1),  # type: ignore[arg-type]
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


def _build_model(
    config: TrainConfig, num_classes: int, class_names: Sequence[str] | None = None
) -> nn.Module:
    """The model, from weights where asked; a classifier trained on other classes starts afresh (another
    count always; the same count when the weights record other ``class_names``)."""
    kwargs = dict(config.model_kwargs)
    kwargs.setdefault("img_size", config.img_size)
    kwargs.setdefault("head_dropout", config.head_dropout)
    model = create_model(
        config.model,
        num_classes=num_classes,
        drop_path_rate=config.drop_path_rate,
        pretrained=config.pretrained,
        checkpoint_path=config.init_checkpoint,
        **kwargs,
    )
    before = _start_classes(config) if class_names is not None else None
    if before is not None and list(before) != list(class_names) and len(before) == num_classes:
        # the same number of classes but other ones (or another order): the loaded head would mislabel
        logger.info(
            "re-initialising the classifier: the weights were trained on classes %s, this data has %s",
            ", ".join(before[:5]), ", ".join(class_names[:5]),
        )  # fmt: skip
        model.reset_classifier(num_classes)
    return model


def _start_classes(config: TrainConfig) -> list[str] | None:
    """The class names of the weights a run starts from, where they are known."""
    if config.pretrained:
        from metaformer.tasks.classify.loading import _imagenet_names

        return _imagenet_names(1000)
    if config.init_checkpoint is None:
        return None
    from metaformer.weights import read_checkpoint, read_metadata
    from metaformer.weights.io import read_folder_config

    path = Path(config.init_checkpoint)
    folder = read_folder_config(path)
    if folder is not None:
        names = folder.get("class_names")
    elif read_checkpoint(path)[1].get("format") == "metaformer":
        names = read_metadata(path).get("class_names")
    else:
        names = None
    return [str(n) for n in names] if names else None


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
    "Train a classifier. Flags left out come from --recipe (paper: the PoolFormer ImageNet recipe, "
    f"the default for folders of {SMALL_DATA_IMAGES:,} training images or more; small: the short recipe "
    "for the digits and smaller folders; finetune: from weights); --print-config prints every value the "
    "run would use. The "
    "resolved settings are saved as config.json in the run folder. Under `torchrun "
    "--nproc_per_node=N -m metaformer classify train` it trains data-parallel.",
)
def train_classifier(config: TrainConfig) -> dict[str, Any]:
    """Train (or fine-tune, or resume) a classifier and return the run summary (also summary.json).

    Under torchrun every process calls this; rank 0 alone writes the run folder.
    """
    recipe, why = config.recipe_choice()
    logger.info("recipe %s: %s", recipe, why)
    return skeleton.train(config, TRAINING)


def _check_data(config: TrainConfig) -> None:
    if is_fashion_mnist(config.data):
        fashion_mnist_dir(str(config.data))  # before the output folder is created
    elif config.data is not None:
        from metaformer.data.folders import check_layout  # torchvision: only for a folder of images

        check_layout(config.data)


def _build(config: TrainConfig, info: DistInfo) -> TrainingParts:
    train, val, classes, skipped = build_datasets(config)
    train_loader, val_loader = skeleton.data_loaders(config, train, val, info, subset=False)
    model = _build_model(config, len(classes), classes).to(info.device)

    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer(
        model,
        opt=config.opt,
        lr=config.lr,
        weight_decay=config.weight_decay,
        eps=config.opt_eps,
        betas=tuple(config.opt_betas),
        layer_decay=config.layer_decay,
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
    trunk = "".join(f" {k} {v}" for k, v in config.model_kwargs.items() if k in ("depths", "dims"))
    describe = (
        f"{config.model}{f' ({trunk.strip()})' if trunk else ''} on {config.data or 'the embedded digits'}: "
        f"{len(train)} train / {len(val)} val "  # type: ignore[arg-type]
        f"images, {len(classes)} classes, recipe '{config.recipe}'"
        + (
            f", layer decay {config.layer_decay:g} (the log shows the head's lr)"
            if config.layer_decay
            else ""
        )
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

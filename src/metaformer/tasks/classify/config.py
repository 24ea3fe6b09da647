"""``TrainConfig``: every option of a classification training run; ``resolve`` fills what is left as None
from the recipe (``recipes.RECIPES``) and the model."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from metaformer.data.fashion_mnist import is_fashion_mnist
from metaformer.errors import ConfigError, check_choice
from metaformer.models import get_variant
from metaformer.options import (
    AT_LEAST_1,
    BELOW_ONE,
    FRACTION,
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    PROBABILITY,
    SEED_RANGE,
    RunOptions,
    option,
)
from metaformer.tasks.classify.recipes import (
    EMBEDDED_IMG_SIZE,
    FASHION_MNIST_IMG_SIZE,
    FOLDER_HFLIP,
    FOLDER_IMG_SIZE,
    INTERPOLATIONS,
    RECIPE_FIELDS,
    RECIPES,
    SMALL_DATA_IMAGES,
    VAL_SPLIT,
)


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
            "help": "ImageFolder tree DIR/train/<class>/*, DIR/val/<class>/* (without val/, or as "
            "DIR/<class>/*: --val-split holds out a part), or fashion-mnist[:DIR] "
            "(default: the embedded digits)"
        },
        "recipe": {"help": "hyperparameter preset (finetune from --pretrained/--init-checkpoint, else "
                   "fashion-mnist on fashion-mnist, small on the digits and on folders under "
                   f"{SMALL_DATA_IMAGES:,} training images, paper on larger ones); "
                   "--print-config prints every value it resolves to"},
        "epochs": {"help": "epochs (paper 300, small 12)"},
        "batch_size": {"help": "images per process per step (paper 128, small 64)"},
        "lr": {"help": "peak learning rate (default: lr-base x global batch / lr-base-batch)"},
        "weight_decay": {"help": "AdamW weight decay, not applied to norms, biases, layer scales (0.05)"},
        "amp": {"help": "off, auto, bf16 or fp16 (auto: bf16 where native, else off)", "choices": None,
                "metavar": "MODE"},
        "clip_grad": {"help": "clip the gradient norm (off)"},
        "num_workers": {"help": "data-loading processes (digits and fashion-mnist 0, folders up to 8)"},
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
        check=BELOW_ONE,
    )
    sched: str | None = option(None, "timm scheduler name (cosine)", metavar="NAME")
    sched_on_steps: bool | None = option(
        None, "update the lr every optimizer step instead of every epoch (paper: per epoch; small: per step)"
    )
    warmup_epochs: int | None = option(
        None, "linear warmup epochs (paper 5, small 1)", metavar="N", check=NON_NEGATIVE
    )
    warmup_lr: float | None = option(
        None, "lr at the start of warmup (paper, finetune 1e-6; small 1e-5)", metavar="LR", check=NON_NEGATIVE
    )
    min_lr: float | None = option(
        None, "cosine floor (paper, small 1e-5; finetune 1e-6)", metavar="LR", check=NON_NEGATIVE
    )
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
        None,
        "horizontal flip probability (paper, finetune 0.5; small 0 on the digits, 0.5 on folders)",
        metavar="P",
        check=PROBABILITY,
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
        check=FRACTION,
    )  # fmt: skip
    drop_path_rate: float | None = option(
        None, "stochastic depth (paper: per model, S12 0.1; small 0)", metavar="P",
        check=BELOW_ONE,
    )  # fmt: skip
    head_dropout: float | None = option(
        None,
        "classifier dropout (0; CAFormer-S36+ in the paper recipe 0.4-0.5)",
        metavar="P",
        check=PROBABILITY,
    )
    ema_decay: float | None = option(
        None, "keep a timm ModelEmaV3 with this decay, e.g. 0.9999 (off)", metavar="D",
        check=OPEN_UNIT,
    )  # fmt: skip
    init_checkpoint: str | None = option(
        None,
        "start from these weights (official, timm or metaformer; another class count re-initialises only "
        "the classifier)",
        metavar="PATH",
    )
    pretrained: bool = option(False, "start from the released ImageNet weights")
    layer_decay: float | None = option(
        None, "layer-wise lr decay: block k of n trains at lr x D**(n-k) (finetune 0.75; paper, small off)",
        metavar="D", check=FRACTION,
    )  # fmt: skip
    val_split: float = option(
        VAL_SPLIT,
        f"fraction of each class held out for validation when the data folder has no val/ ({VAL_SPLIT})",
        metavar="F",
        check=OPEN_UNIT,
    )
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

    @property
    def recipe_name(self) -> str:
        """The recipe asked for, else finetune from weights, fashion-mnist on Fashion-MNIST, small on the
        digits and on folders under ``SMALL_DATA_IMAGES`` training images, paper on larger folders."""
        return self.recipe_choice()[0]

    def recipe_choice(self) -> tuple[str, str]:
        """(the recipe, why it applies): the reason is the first line a training run prints."""
        if self.recipe is not None:
            return self.recipe, "asked for with --recipe"
        if self.pretrained or self.init_checkpoint is not None:
            return "finetune", "training starts from weights"
        if self.data is None:
            return "small", "the embedded digits' default (no flips: a mirrored digit can change class)"
        if is_fashion_mnist(self.data):
            return "fashion-mnist", "the default for Fashion-MNIST"
        images = _training_images(str(self.data), self.val_split)
        if images is None:
            return "paper", f"the default for --data ('{self.data}' is not a folder here to count)"
        if images < SMALL_DATA_IMAGES:
            return "small", (
                f"'{self.data}' has {images:,} training images, under {SMALL_DATA_IMAGES:,} "
                f"(horizontal flips at p {FOLDER_HFLIP:g}; --recipe paper for the ImageNet recipe)"
            )
        return "paper", f"'{self.data}' has {SMALL_DATA_IMAGES:,} or more training images"

    def resolve(self, world_size: int = 1) -> TrainConfig:
        """A copy with every recipe field filled in, the lr scaled, and data-dependent defaults set."""
        recipe = self.recipe_name
        values = dict(RECIPES[recipe])
        if recipe == "small" and self.data is not None and not is_fashion_mnist(self.data):
            values["hflip"] = FOLDER_HFLIP  # photographs may be mirrored; the digits may not
        variant = get_variant(self.model)
        values.setdefault("drop_path_rate", variant.drop_path_rate)
        fashion = is_fashion_mnist(self.data)
        values.setdefault("crop_pct", 1.0 if fashion else _default_crop_pct(self.model))  # 28 px: keep all
        filled = self.recipe_values(RECIPE_FIELDS, values)
        global_batch = filled["batch_size"] * world_size * filled["accum_steps"]
        lr = self.lr if self.lr is not None else filled["lr_base"] * global_batch / filled["lr_base_batch"]
        head_dropout = self.head_dropout
        if head_dropout is None:
            head_dropout = (
                float(variant.train_overrides.get("head_dropout", 0.0))
                if recipe in ("paper", "finetune")
                else 0.0
            )
        img_size = self.img_size
        if img_size is None:
            img_size = EMBEDDED_IMG_SIZE if self.data is None else FOLDER_IMG_SIZE
            img_size = FASHION_MNIST_IMG_SIZE if fashion else img_size
        workers = self.num_workers
        if workers is None:
            in_memory = self.data is None or fashion  # decoded arrays: loader processes only add copies
            workers = 0 if in_memory else min(8, max(1, (os.cpu_count() or 2) - 1))
        # a recipe's trunk (fashion-mnist's) stands in only where the user gave no --model-kwargs
        model_kwargs = self.model_kwargs or dict(values.get("model_kwargs", {}))
        return dataclasses.replace(
            self,
            recipe=recipe,
            model_kwargs=model_kwargs,
            lr=lr,
            head_dropout=head_dropout,
            img_size=img_size,
            num_workers=workers,
            **filled,
        )


@functools.lru_cache(maxsize=16)
def _training_images(data: str, val_split: float) -> int | None:
    """Training images in a folder (DIR/train, else all but the held-out part), counted up to the small
    recipe's bound; None when there is no such folder."""
    from metaformer.data.images import count_images

    root = Path(data)
    if not root.is_dir():
        return None
    if (root / "train").is_dir():
        return count_images(root / "train", SMALL_DATA_IMAGES)
    total = count_images(root, math.ceil(SMALL_DATA_IMAGES / (1 - val_split)))
    return int(total * (1 - val_split))


def _default_crop_pct(model: str) -> float:
    """The eval crop of the model's released ImageNet weights (0.9 for S, 0.95 for M PoolFormers)."""
    from metaformer.weights import DEFAULT_TAGS, PRETRAINED

    tag = DEFAULT_TAGS.get(model)
    return PRETRAINED[tag].crop_pct if tag else 0.9

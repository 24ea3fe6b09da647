"""Classification recipes: the hyperparameter presets ``TrainConfig`` fills its None fields from (``paper``,
``small``, ``fashion-mnist`` and ``finetune``), and the constants that go with them (default image sizes,
interpolations, what may change between a run and its ``--resume``)."""

from __future__ import annotations

from typing import Any

from metaformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Small data sets (the default run on the 32x32 digits): short per-step cosine schedule, light geometric
# augmentation, no flips (digits are not mirror-symmetric), no mixup, no random erasing.
_SMALL: dict[str, Any] = {
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
    "layer_decay": None,
}

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
        "layer_decay": None,  # every layer at the full lr
    },
    "small": _SMALL,
    # Fashion-MNIST from scratch (the default with --data fashion-mnist): the small recipe at a batch of 128,
    # with flips (clothes are mirror-symmetric), on a six-block half-width trunk unless --model-kwargs says
    # otherwise: at 8x8 tokens a 2-core CPU trains it 2.2x faster than the 12-block S12 at half width, and it
    # reaches the same accuracy in the same time with more epochs (docs/training.md).
    "fashion-mnist": {
        **_SMALL,
        "epochs": 10,
        "batch_size": 128,
        "hflip": 0.5,
        "model_kwargs": {"depths": [1, 1, 3, 1], "dims": [32, 64, 128, 256]},
    },
    # Fine-tuning from weights (the default with --pretrained or --init-checkpoint). From sail-sg/metaformer's
    # fine-tuning commands: AdamW, a few tens of epochs, no mixup or cutmix, the model's drop path and head
    # dropout; their lr 5e-5 re-tunes ImageNet weights at batch 1024, so the lr here is per 64 images and
    # was chosen by the sweep in benchmarks/finetune.py (docs/training.md). From timm's conventions: a short
    # per-step cosine schedule, layer-wise lr decay over the model's group_matcher() (the stem learns at
    # 0.75**13 of the head's lr on S12), light augmentation. No EMA: at a few hundred steps an average with
    # the usual 0.9999 decay stays at the starting weights (--ema-decay turns it on for long runs).
    "finetune": {
        **{k: v for k, v in _SMALL.items() if k not in ("crop_pct", "drop_path_rate")},  # the model's
        "epochs": 20,
        "batch_size": 32,
        "lr_base": 4e-3,  # the best of 2.5e-4 ... 1.6e-2 in benchmarks/finetune.py (docs/training.md)
        "warmup_epochs": 2,
        "warmup_lr": 1e-6,
        "min_lr": 1e-6,
        "scale": (0.5, 1.0),
        "ratio": (3 / 4, 4 / 3),
        "hflip": 0.5,
        "amp": "auto",
        "layer_decay": 0.75,
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
    "layer_decay",
)
# Options that may change between a run and its --resume, besides the shared ones (skeleton.py). The
# process count may change too (the lr, scaled by the global batch, is still checked: pass --lr to keep
# it); then random streams differ.
RESUME_MAY_DIFFER = ("eval_every", "class_names", "world_size")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
EMBEDDED_IMG_SIZE = 32
FOLDER_IMG_SIZE = 224
FASHION_MNIST_IMG_SIZE = 32  # the 28x28 photographs, enlarged to the smallest input a MetaFormer takes
VAL_SPLIT = 0.1  # the fraction held out of a folder without val/
# a folder with fewer training images than this trains with the small recipe (and flips) by default
SMALL_DATA_IMAGES = 20_000
FOLDER_HFLIP = 0.5  # the small recipe's flips on a folder of photographs (the digits keep none)

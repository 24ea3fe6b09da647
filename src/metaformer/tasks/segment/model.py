"""The Semantic FPN segmenter (the paper's mmsegmentation model, PAPER.md 6.1) on a MetaFormer backbone.

FPN over the four stages (256 channels), then mmseg's ``FPNHead``: every level goes through 3x3
conv-BN-ReLU blocks (128 channels) with a x2 bilinear upsample after each until it reaches stride 4, the
levels are summed, and dropout 0.1 and a 1x1 classifier give logits at stride 4, which are upsampled x4 to
the input size. The model alone, so that the official checkpoints' mapping (``segment.openmmlab``) and the
task (``segment.train``) both build it without importing each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metaformer.data.segmentation import IGNORE_INDEX
from metaformer.errors import ConfigError, check_number
from metaformer.tasks.dense.files import tuple_values
from metaformer.tasks.dense.fpn import BackboneFPN, create_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # = mmseg's (123.675, 116.28, 103.53) / 255
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything needed to rebuild a Semantic FPN; saved with its weights. Defaults are the paper's."""

    num_classes: int
    backbone: str = "poolformer_s12"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    frozen_stages: int = -1
    fpn_channels: int = 256
    head_channels: int = 128
    dropout: float = 0.1
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"a segmenter needs at least one class, got num_classes={self.num_classes}")
        check_number("fpn_channels", self.fpn_channels, low=1)
        check_number("head_channels", self.head_channels, low=1)
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        object.__setattr__(self, "backbone_overrides", tuple_values(self.backbone_overrides))


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SemanticFPNHead(nn.Module):
    """mmseg's FPNHead: per-level conv + x2 upsample stacks to the finest stride, summed, 1x1 classifier."""

    def __init__(
        self,
        in_channels: int,
        strides: Sequence[int],
        num_classes: int,
        channels: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: list[nn.Module] = []
            for k in range(steps):
                layers.append(_conv_bn_relu(in_channels if k == 0 else channels, channels))
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """FPN maps, finest first -> logits (B, K, H/stride0, W/stride0)."""
        out = self.scale_heads[0](features[0])
        for head, x in zip(self.scale_heads[1:], features[1:], strict=True):
            out = out + F.interpolate(head(x), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Images (B, 3, H, W) in [0, 1] -> class logits (B, K, H, W); normalises with ImageNet statistics."""

    def __init__(
        self, neck: BackboneFPN, num_classes: int, *, head_channels: int = 128, dropout: float = 0.1
    ):
        super().__init__()
        self.neck = neck
        self.head = SemanticFPNHead(neck.out_channels, neck.strides, num_classes, head_channels, dropout)
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        features = list(self.neck(x).values())
        logits = self.head(features)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def create_segmenter(
    config: SegmenterConfig, *, backbone_checkpoint: str | Path | None = None
) -> SemanticFPN:
    """A Semantic FPN over the four stages of the named backbone (optionally from classification weights)."""
    backbone = create_backbone(
        config.backbone,
        out_indices=(0, 1, 2, 3),
        checkpoint_path=backbone_checkpoint,
        **config.backbone_overrides,
    )
    neck = BackboneFPN(
        backbone, out_channels=config.fpn_channels, extra=None, frozen_stages=config.frozen_stages
    )
    model = SemanticFPN(neck, config.num_classes, head_channels=config.head_channels, dropout=config.dropout)
    model.segmenter_config = config  # type: ignore[assignment]
    # names the architecture where deployment keeps per-model records (backend choices, build costs)
    digest = hashlib.sha256(
        json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode()
    ).hexdigest()
    model.model_name = f"semantic_fpn_{config.backbone}_{digest[:8]}"  # type: ignore[assignment]
    return model


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross entropy over labelled pixels (per-class weighted, as mmseg's ``class_weight``, if given);
    logits are resized to the target first if they differ."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    if class_weight is not None:
        class_weight = class_weight.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index)

"""A MetaFormer backbone with a torchvision FeaturePyramidNetwork: the neck detection and segmentation share.

The contract is torchvision's ``BackboneWithFPN``: ``forward(images)`` returns an OrderedDict of
``out_channels``-wide maps, finest first, which is all RetinaNet, Mask R-CNN and the Semantic FPN head
need. The FPN's input widths come from the backbone's ``feature_info``, never from a hand-typed list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from metaformer.errors import ConfigError
from metaformer.models import create_model
from metaformer.models.metaformer import MetaFormerFeatures


def create_backbone(
    name: str,
    *,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    checkpoint_path: str | Path | None = None,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> MetaFormerFeatures:
    """The official dense backbone: stage maps at ``out_indices``, each through its own fresh GroupNorm.

    ``checkpoint_path`` takes a classification checkpoint (official, timm or ours); its head is unused.
    Drop path defaults to 0, as in the paper's detection and segmentation configs (PAPER.md 1.11).
    """
    return create_model(
        name,
        features_only=True,
        out_indices=out_indices,
        out_norm=True,
        checkpoint_path=checkpoint_path,
        drop_path_rate=drop_path_rate,
        **overrides,
    )


class LastLevelP6P7OnInput(ExtraFPNBlock):
    """RetinaNet's P6 = conv3x3/2(C5) and P7 = conv3x3/2(P6), mmdetection's ``add_extra_convs='on_input'``.

    Unlike torchvision's LastLevelP6P7 it always reads C5 (also when C5 already has the FPN's width) and,
    as mmdetection's default ``relu_before_extra_convs=False``, applies no ReLU before P7.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)

    def forward(
        self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]
    ) -> tuple[list[torch.Tensor], list[str]]:
        p6 = self.p6(c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


class BackboneFPN(nn.Module):
    """Backbone -> OrderedDict {'0': finest, ..., extra levels} of ``out_channels`` maps.

    ``extra``: None (the Semantic FPN), ``"pool"`` (Mask R-CNN's max-pooled P6) or ``"p6p7"``
    (RetinaNet's P6/P7 from C5). ``frozen_stages`` freezes the stem (0) and stages 1..k (k >= 1),
    mmdetection's convention; -1 trains everything. Frozen parts stay in eval mode.
    """

    def __init__(
        self,
        backbone: MetaFormerFeatures,
        *,
        out_channels: int = 256,
        extra: str | None = None,
        frozen_stages: int = -1,
    ):
        super().__init__()
        in_channels = backbone.out_channels
        if extra == "pool":
            extra_block: ExtraFPNBlock | None = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7OnInput(in_channels[-1], out_channels)
        elif extra is None:
            extra_block = None
        else:
            raise ConfigError(f"unknown FPN extra levels '{extra}'; choose 'pool', 'p6p7' or None")
        num_stages = len(backbone.stages)
        if not -1 <= frozen_stages <= num_stages:
            raise ConfigError(f"frozen_stages must be in -1..{num_stages}, got {frozen_stages}")
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels
        self.strides = list(backbone.strides)
        self.frozen_stages = frozen_stages
        for module in self.fpn.modules():  # the paper initialises the added layers with Xavier
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self._frozen_modules():
            for param in module.parameters():
                param.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.body.stem, *list(self.body.stages)[: self.frozen_stages]]

    def train(self, mode: bool = True) -> BackboneFPN:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))

"""The detectors: torchvision RetinaNet / Mask R-CNN on a MetaFormer backbone with an FPN, built from a
``DetectorConfig`` that is saved with the weights, and the save / load of those weights.

The models follow the paper's mmdetection configs (PAPER.md 5.1) with torchvision's implementations:

- RetinaNet: FPN over stages 2-4 (strides 8-32) plus P6/P7 from convs on C5 (``add_extra_convs='on_input'``);
  the stage-1 output has no norm because the FPN does not read it (the official ``FORK_LAST3``).
- Mask R-CNN: FPN over all four stages plus a max-pooled P6, RPN, box and mask heads.

Labels are 1..K (0 is the background) for both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from metaformer.errors import ConfigError
from metaformer.tasks.dense.files import load_strict, read_task_metadata, save_task_weights, tuple_values
from metaformer.tasks.dense.fpn import BackboneFPN, create_backbone

ARCHS = ("retinanet", "maskrcnn")
DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # mmdetection and torchvision: one base size per FPN level


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to rebuild a detector; saved with its weights. Defaults are the paper's."""

    num_classes: int
    arch: str = "retinanet"
    backbone: str = "poolformer_s12"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    frozen_stages: int = -1
    fpn_channels: int = 256
    head_norm: bool = False
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: tuple[int, ...] = DEFAULT_ANCHOR_SIZES
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown detector '{self.arch}'; choose one of {', '.join(ARCHS)}")
        if self.num_classes < 1:
            raise ConfigError(f"a detector needs at least one class, got num_classes={self.num_classes}")
        if len(self.anchor_sizes) != 5 or any(s <= 0 for s in self.anchor_sizes):
            raise ConfigError(
                f"anchor_sizes needs 5 positive sizes (one per FPN level), got {self.anchor_sizes}"
            )
        if not 0 < self.min_size <= self.max_size:
            raise ConfigError(f"need 0 < min_size <= max_size, got {self.min_size} and {self.max_size}")
        if self.head_norm and self.arch != "retinanet":
            raise ConfigError("head_norm (GroupNorm in the head convs) is available for RetinaNet only")
        object.__setattr__(self, "anchor_sizes", tuple(int(s) for s in self.anchor_sizes))
        object.__setattr__(self, "backbone_overrides", tuple_values(self.backbone_overrides))

    @property
    def masks(self) -> bool:
        return self.arch == "maskrcnn"


def create_detector(config: DetectorConfig, *, backbone_checkpoint: str | Path | None = None) -> nn.Module:
    """A torchvision RetinaNet or MaskRCNN whose backbone is a MetaFormer with an FPN.

    The model takes a list of float (3, H, W) images in [0, 1]; it resizes them (shorter side
    ``min_size``, longer side at most ``max_size``), normalises with ImageNet statistics and pads to a
    multiple of 32 itself, as torchvision's GeneralizedRCNNTransform does.
    """
    from torchvision.models.detection import MaskRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead

    ratios = ((0.5, 1.0, 2.0),) * 5
    common = dict(min_size=config.min_size, max_size=config.max_size)
    if config.arch == "retinanet":
        backbone = create_backbone(
            config.backbone,
            out_indices=(1, 2, 3),
            checkpoint_path=backbone_checkpoint,
            **config.backbone_overrides,
        )
        neck = BackboneFPN(
            backbone, out_channels=config.fpn_channels, extra="p6p7", frozen_stages=config.frozen_stages
        )
        sizes = tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in config.anchor_sizes)  # 3 octave scales
        anchors = AnchorGenerator(sizes, ratios)
        # GroupNorm in the head convs (torchvision's RetinaNet v2) makes training from scratch converge faster
        groups = math.gcd(32, max(config.fpn_channels // 2, 1))  # >= 2 channels a group: P7 can be 1x1
        norm = partial(nn.GroupNorm, groups) if config.head_norm else None
        head = RetinaNetHead(
            config.fpn_channels,
            anchors.num_anchors_per_location()[0],
            config.num_classes + 1,
            norm_layer=norm,
        )
        model: nn.Module = RetinaNet(
            neck,
            num_classes=config.num_classes + 1,
            anchor_generator=anchors,
            head=head,
            score_thresh=config.score_thresh,
            nms_thresh=config.nms_thresh,
            detections_per_img=config.detections_per_img,
            topk_candidates=1000,
            **common,
        )
    else:
        backbone = create_backbone(
            config.backbone,
            out_indices=(0, 1, 2, 3),
            checkpoint_path=backbone_checkpoint,
            **config.backbone_overrides,
        )
        neck = BackboneFPN(
            backbone, out_channels=config.fpn_channels, extra="pool", frozen_stages=config.frozen_stages
        )
        model = MaskRCNN(
            neck,
            num_classes=config.num_classes + 1,
            rpn_anchor_generator=AnchorGenerator(tuple((s,) for s in config.anchor_sizes), ratios),
            rpn_pre_nms_top_n_train=2000,
            rpn_post_nms_top_n_train=1000,
            rpn_pre_nms_top_n_test=1000,
            rpn_post_nms_top_n_test=1000,
            box_score_thresh=config.score_thresh,
            box_nms_thresh=config.nms_thresh,
            box_detections_per_img=config.detections_per_img,
            **common,
        )
    model.detector_config = config  # type: ignore[assignment]
    return model


def save_detector(
    model: nn.Module, path: str | Path, *, class_names: Sequence[str], cat_ids: Sequence[int]
) -> None:
    """Safetensors with the DetectorConfig, class names and COCO category ids, so eval/predict rebuild it."""
    cat_ids = [int(c) for c in cat_ids]
    save_task_weights(
        model, path, model.detector_config, task="detect", class_names=class_names, cat_ids=cat_ids
    )


def load_detector(path: str | Path) -> tuple[nn.Module, list[str], list[int]]:
    """(eval-mode detector, class names, category ids) from a file written by ``save_detector``."""
    from metaformer.weights import read_state_dict

    meta = read_task_metadata(path, "detect", "detector")
    fields = dict(meta["config"])
    fields["anchor_sizes"] = tuple(fields.get("anchor_sizes", DEFAULT_ANCHOR_SIZES))
    model = create_detector(DetectorConfig(**fields))
    load_strict(model, read_state_dict(path), path)
    names = list(meta.get("class_names") or [str(i + 1) for i in range(model.detector_config.num_classes)])
    cat_ids = (
        [int(c) for c in json.loads(meta["cat_ids"])] if "cat_ids" in meta else list(range(1, len(names) + 1))
    )
    return model.eval(), names, cat_ids

"""The official Semantic FPN checkpoints (sail-sg/poolformer on mmseg v0.x) as our ``SemanticFPN``.

The two models correspond module for module, so the whole checkpoint loads, strictly:

- ``backbone.*`` (official v1 names) -> ``neck.body.*``; its output norms ``backbone.norm0/2/4/6`` ->
  ``neck.body.out_norms.{0..3}``
- mmseg FPN ``neck.lateral_convs.{i}.conv`` (1x1) -> torchvision FPN ``neck.fpn.inner_blocks.{i}.0``
- ``neck.fpn_convs.{i}.conv`` (3x3) -> ``neck.fpn.layer_blocks.{i}.0``; both top-down paths add a
  nearest-neighbour upsample of the coarser lateral.
- ``decode_head.scale_heads.{i}.{k}.conv`` / ``.bn`` (ConvModule: conv, SyncBN, ReLU; ``Upsample`` entries
  hold no weights) -> ``head.scale_heads.{i}.{k}.0`` / ``.1``
- ``decode_head.conv_seg`` -> ``head.classifier`` (after the same dropout, which holds no weights).

Class names come from the checkpoint's ``meta["CLASSES"]`` when present; the eval resize is mmseg's test
pipeline (``SegAugment()``: shorter side 512, size divisor 32).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from metaformer.errors import CheckpointError

logger = logging.getLogger(__name__)

MMSEG_TO_OURS = (
    (r"neck\.lateral_convs\.(?P<i>\d+)\.conv\.(?P<p>weight|bias)", "neck.fpn.inner_blocks.{i}.0.{p}"),
    (r"neck\.fpn_convs\.(?P<i>\d+)\.conv\.(?P<p>weight|bias)", "neck.fpn.layer_blocks.{i}.0.{p}"),
    (r"decode_head\.scale_heads\.(?P<i>\d+)\.(?P<k>\d+)\.conv\.weight", "head.scale_heads.{i}.{k}.0.weight"),
    (r"decode_head\.scale_heads\.(?P<i>\d+)\.(?P<k>\d+)\.bn\.(?P<p>\w+)", "head.scale_heads.{i}.{k}.1.{p}"),
    (r"decode_head\.conv_seg\.(?P<p>weight|bias)", "head.classifier.{p}"),
    (r"stage_norms\.(?P<s>\d+)\.(?P<p>weight|bias)", "neck.body.out_norms.{s}.{p}"),
    (r"(?P<rest>(stem|stages)\..+)", "neck.body.{rest}"),
)


def is_mmseg_semantic_fpn(state: Mapping[str, torch.Tensor]) -> bool:
    return "decode_head.conv_seg.weight" in state and "backbone.patch_embed.proj.weight" in state


def remap_mmseg_semantic_fpn(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Semantic FPN keys -> our SemanticFPN's; keys of other modules pass through unchanged."""
    from metaformer.weights.layouts import remap_mmdet_mmseg_keys, rename_keys

    return rename_keys(remap_mmdet_mmseg_keys(state), MMSEG_TO_OURS)


def load_mmseg_segmenter(path: str | Path):  # -> tuple[SemanticFPN, list[str], SegAugment]
    """(eval-mode SemanticFPN, class names, mmseg's test resize) from an official mmseg checkpoint."""
    from metaformer.data.segmentation import SegAugment
    from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter
    from metaformer.weights import compare_state_dict, read_state_dict
    from metaformer.weights.convert import infer_model_name
    from metaformer.weights.io import read_checkpoint_extras

    state = remap_mmseg_semantic_fpn(read_state_dict(path))
    backbone = {k[len("neck.body.") :]: v for k, v in state.items() if k.startswith("neck.body.")}
    backbone = {k: v for k, v in backbone.items() if not k.startswith("out_norms.")}
    levels = sorted(
        int(k.split(".")[3]) for k in state if k.startswith("neck.fpn.inner_blocks.") and "weight" in k
    )
    if levels != [0, 1, 2, 3]:
        raise CheckpointError(
            f"'{path}' has an FPN over levels {levels}; the Semantic FPN uses all four stages, so this "
            "is not an official Semantic FPN checkpoint"
        )
    config = SegmenterConfig(
        num_classes=int(state["head.classifier.weight"].shape[0]),
        backbone=infer_model_name(backbone, Path(path), pooling_only=True),
        fpn_channels=int(state["neck.fpn.inner_blocks.0.0.weight"].shape[0]),
        head_channels=int(state["head.scale_heads.0.0.0.weight"].shape[0]),
    )
    model = create_segmenter(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected, mismatched = compare_state_dict(state, shapes)
    if missing or unexpected or mismatched:
        first = (missing + unexpected + mismatched)[:3]
        raise CheckpointError(
            f"'{path}' does not map onto a {config.backbone} Semantic FPN: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} wrong-shape keys (first: {', '.join(first)}); "
            "only the official Semantic FPN checkpoints (FPN neck + FPNHead) load whole"
        )
    model.load_state_dict(state, strict=True)
    classes = read_checkpoint_extras(path).get("CLASSES")
    names = [str(c) for c in classes] if classes else [str(i) for i in range(config.num_classes)]
    if len(names) != config.num_classes:
        raise CheckpointError(
            f"'{path}' lists {len(names)} CLASSES for {config.num_classes} output channels; the file is "
            "malformed"
        )
    logger.info("loaded %s (mmseg Semantic FPN) as a %s Semantic FPN", path, config.backbone)
    return model.eval(), names, SegAugment()


__all__ = ["MMSEG_TO_OURS", "is_mmseg_semantic_fpn", "load_mmseg_segmenter", "remap_mmseg_semantic_fpn"]

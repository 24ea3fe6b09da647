"""A Semantic FPN's weights file: ours (safetensors with the model's config, class names and eval resize)
or an official mmseg checkpoint (``segment.openmmlab``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from metaformer.data.segmentation import SegAugment
from metaformer.tasks.dense.files import load_strict, read_task_metadata, save_task_weights
from metaformer.tasks.segment.model import SegmenterConfig, SemanticFPN, create_segmenter


def save_segmenter(
    model: nn.Module, path: str | Path, *, class_names: Sequence[str], augment: SegAugment
) -> None:
    """Safetensors with the SegmenterConfig, class names and the eval resize, so eval/predict rebuild it."""
    augment_fields = dataclasses.asdict(augment)
    save_task_weights(
        model, path, model.segmenter_config, task="segment", class_names=class_names, augment=augment_fields
    )


def load_segmenter(path: str | Path) -> tuple[SemanticFPN, list[str], SegAugment]:
    """(eval-mode model, class names, the augmentation it was trained with) from ``save_segmenter``,
    or from an official mmseg Semantic FPN checkpoint (with mmseg's test resize)."""
    from metaformer.weights import read_state_dict

    if not str(path).endswith(".safetensors"):  # an official mmseg checkpoint loads whole (openmmlab.py)
        from metaformer.tasks.segment.openmmlab import is_mmseg_semantic_fpn, load_mmseg_segmenter

        if is_mmseg_semantic_fpn(read_state_dict(path)):
            return load_mmseg_segmenter(path)
    meta = read_task_metadata(path, "segment", "segmentation")
    model = create_segmenter(SegmenterConfig(**meta["config"]))
    load_strict(model, read_state_dict(path), path)
    aug = json.loads(meta["augment"]) if "augment" in meta else {}
    augment = SegAugment(**{k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
    names = list(meta.get("class_names") or [str(i) for i in range(model.num_classes)])
    return model.eval(), names, augment

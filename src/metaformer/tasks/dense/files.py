"""The files detect and segment share: image paths in and PNGs out, their weights with the metadata that
rebuilds the model, and the checks that a checkpoint fits its data."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from metaformer.data import images
from metaformer.errors import CheckpointError
from metaformer.weights import atomic_write

logger = logging.getLogger(__name__)


def check_classes(checkpoint: str | Path, trained: Sequence[str], data: Sequence[str], where: str) -> None:
    """A checkpoint only fits data with as many classes as it was trained for."""
    if len(trained) != len(data):
        raise CheckpointError(
            f"checkpoint '{checkpoint}' was trained for {len(trained)} classes but {where} has {len(data)}; "
            "evaluate on data with the classes it was trained on, or train a new model"
        )
    if list(trained) != list(data):
        logger.warning(
            "class names differ between the checkpoint (%s) and the data (%s)",
            list(trained)[:5],
            list(data)[:5],
        )


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1]."""
    array = np.asarray(images.open_rgb(path), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


def save_png(image: torch.Tensor, path: Path) -> None:
    """A (3, H, W) or (H, W) uint8 tensor as a PNG file, atomically."""
    array = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict(strict=True) with a one-sentence CheckpointError naming the first problem."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0])[:200]
        raise CheckpointError(
            f"the weights in '{path}' do not fit the model they describe ({first}); re-save them"
        ) from None


def save_task_weights(
    model: nn.Module, path: str | Path, config: Any, *, task: str, class_names: Sequence[str], **metadata: Any
) -> None:
    """Safetensors with the model's config dataclass, class names and ``metadata``, so eval/predict rebuild
    the model from the file alone."""
    from metaformer.weights import write_weights

    write_weights(
        model.state_dict(),
        path,
        model_name=config.backbone,
        config=dataclasses.asdict(config),
        num_classes=config.num_classes,
        class_names=class_names,
        metadata={"task": task, **metadata},
    )


def read_task_metadata(path: str | Path, task: str, kind: str) -> dict[str, Any]:
    """The metadata of a file ``save_task_weights`` wrote for ``task``; CheckpointError for any other."""
    from metaformer.weights import read_metadata

    meta = read_metadata(path)
    if meta.get("task") != task:
        raise CheckpointError(
            f"'{path}' is not a {kind} checkpoint (task {meta.get('task') or 'classify'}); pass the "
            f"best.safetensors or last.safetensors of a `metaformer {task} train` run"
        )
    return meta


def tuple_values(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Lists to tuples in a dict of model overrides, so a config read back from JSON equals the original."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}

"""Grad-CAM (Selvaraju et al. 2017) for a MetaFormer classifier, and the PNG overlay that
``metaformer classify predict --cam`` writes."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from metaformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from metaformer.errors import ConfigError


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

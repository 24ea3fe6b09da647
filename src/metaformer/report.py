"""Model tables for the CLI and the README, computed from the code (never typed by hand)."""

from __future__ import annotations

from typing import Any

import torch

from metaformer.complexity import count_macs, count_params
from metaformer.errors import check_number
from metaformer.models import create_model, get_variant, list_models
from metaformer.models.metaformer import MIN_INPUT_SIZE


def model_table(pattern: str = "*", *, with_macs: bool = True) -> list[dict[str, Any]]:
    """One row per model: params (all, incl. frozen), GMACs at 224, the paper's top-1."""
    rows = []
    for name in list_models(pattern):
        variant = get_variant(name)
        model = create_model(name)
        frozen = count_params(model) - count_params(model, trainable_only=True)
        rows.append(
            {
                "model": name,
                "family": variant.family,
                "params_m": count_params(model) / 1e6,
                "frozen_params_m": frozen / 1e6,
                "gmacs": count_macs(model, 224) / 1e9 if with_macs else None,
                "paper_top1": variant.paper_top1,
                "paper_params_m": variant.paper_params_m,
                "paper_gmacs": variant.paper_gmacs,
            }
        )
    return rows


def model_info(name: str, img_size: tuple[int, int] = (224, 224)) -> dict[str, Any]:
    """Per-stage output shapes (from a real forward pass), params and MACs at ``img_size``."""
    check_number("img_size", img_size, low=MIN_INPUT_SIZE)
    variant = get_variant(name)
    model = create_model(name, img_size=img_size).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.zeros(1, model.in_chans, *img_size), intermediates_only=True)
    stages = []
    for i, (fmap, info) in enumerate(zip(maps, model.feature_info, strict=True)):
        stages.append(
            {
                "index": i,
                "mixer": str(variant.config.mixers[i]),
                "norm": str(variant.config.norms[i]),
                "depth": variant.config.depths[i],
                "output_shape": list(fmap.shape[1:]),
                "stride": info["reduction"],
                "params": count_params(model.stages[i]),
            }
        )
    return {
        "model": name,
        "family": variant.family,
        "img_size": list(img_size),
        "params": count_params(model),
        "macs": count_macs(model, img_size),
        "paper_top1": variant.paper_top1,
        "stages": stages,
    }

"""Model tables for the CLI and the README, computed from the code (never typed by hand)."""

from __future__ import annotations

from typing import Any

import torch

from metaformer.complexity import count_macs, count_params
from metaformer.errors import check_number
from metaformer.model_counts import MODEL_COUNTS
from metaformer.models import create_model, get_variant, list_models
from metaformer.models.metaformer import MIN_INPUT_SIZE


def count_model(name: str) -> tuple[int, int, int]:
    """(params, frozen params, MACs at 224) of a registered model, counted on the meta device: shapes
    only, no weights allocated or initialised, the same counts as on the CPU."""
    with torch.device("meta"):
        model = create_model(name)
    params = count_params(model)
    return params, params - count_params(model, trainable_only=True), count_macs(model, 224)


def model_table(pattern: str = "*", *, with_macs: bool = True) -> list[dict[str, Any]]:
    """One row per model: params (all, incl. frozen), GMACs at 224, the paper's top-1. The counts come
    from ``MODEL_COUNTS`` (a model registered at run time is counted now)."""
    rows = []
    for name in list_models(pattern):
        variant = get_variant(name)
        params, frozen, macs = MODEL_COUNTS.get(name) or count_model(name)
        rows.append(
            {
                "model": name,
                "family": variant.family,
                "params_m": params / 1e6,
                "frozen_params_m": frozen / 1e6,
                "gmacs": macs / 1e9 if with_macs else None,
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
        "paper_top1": variant.paper_top1 if tuple(img_size) == (224, 224) else None,
        "weights_top1": weights_top1(name, img_size),
        "stages": stages,
    }


def weights_top1(name: str, img_size: tuple[int, int]) -> dict[str, float]:
    """The reported ImageNet-1K top-1 of each released weights of ``name`` evaluated at ``img_size``."""
    from metaformer.weights.pretrained import PRETRAINED

    return {
        tag: record.top1
        for tag, record in PRETRAINED.items()
        if record.model_name == name
        and tuple(record.input_size[1:]) == tuple(img_size)
        and record.num_classes == 1000
        and record.top1 is not None
    }

"""create_model and list_models: the single entry point to the model table."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from metaformer.errors import ConfigError
from metaformer.models.metaformer import MetaFormer, MetaFormerFeatures
from metaformer.models.variants import VARIANTS, get_variant, model_kwargs


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in VARIANTS if fnmatch.fnmatch(name, pattern))


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    drop_path_rate: float | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    out_norm: bool | str | None = None,
    in_chans: int = 3,
    **overrides: Any,
) -> nn.Module:
    """Build a named MetaFormer, optionally with released or local weights.

    ``drop_path_rate=None`` uses the paper's training rate for this model (it has no effect in eval).
    ``features_only=True`` returns a ``MetaFormerFeatures`` backbone whose forward gives the stage maps
    at ``out_indices``; ``out_norm=True`` adds the official dense models' fresh GroupNorm per output.
    Overrides are any ``MetaFormerConfig`` field (``mixers``, ``norms``, ``act``, ``final_norm``...).
    """
    variant = get_variant(name)
    if pretrained and checkpoint_path is not None:
        raise ConfigError("pass either pretrained=True or checkpoint_path, not both")
    rate = variant.drop_path_rate if drop_path_rate is None else drop_path_rate
    kwargs = model_kwargs(name, **overrides)
    kwargs.update(num_classes=0 if features_only else num_classes, in_chans=in_chans, drop_path_rate=rate)
    model: nn.Module = MetaFormer(**kwargs)
    model.model_name = name  # type: ignore[assignment]
    model.model_config = kwargs  # type: ignore[assignment]
    if features_only:  # wrap first, so a dense checkpoint's output norms load into out_norms
        norm = "groupnorm1" if out_norm is True else (out_norm or None)
        model = MetaFormerFeatures(model, out_indices=out_indices, out_norm=norm)  # type: ignore[arg-type]
        model.model_name = name  # type: ignore[assignment]
        model.model_config = kwargs  # type: ignore[assignment]
    if pretrained or checkpoint_path is not None:
        from metaformer.weights.loading import load_pretrained, load_weights

        if pretrained:
            load_pretrained(model, name)
        else:
            load_weights(model, checkpoint_path)  # type: ignore[arg-type]
    return model

"""create_model and list_models: the single entry point to the model table."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from metaformer.errors import ConfigError
from metaformer.models.features import MetaFormerFeatureGetter, trace_features
from metaformer.models.metaformer import MetaFormer, MetaFormerFeatures, stage_grid_sizes
from metaformer.models.variants import VARIANTS, get_variant, model_kwargs


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(name for name in VARIANTS if fnmatch.fnmatch(name, pattern))


FEATURE_CLASSES = ("list", "getter", "fx")
FEATURE_CFG_KEYS = ("feature_cls", "out_indices", "out_norm", "norm")


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    pretrained: bool = False,
    checkpoint_path: str | Path | None = None,
    drop_path_rate: float | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    out_norm: bool | str | None = None,
    feature_cls: str | None = None,
    feature_cfg: dict[str, Any] | None = None,
    in_chans: int = 3,
    global_pool: str = "avg",
    **overrides: Any,
) -> nn.Module:
    """Build a named MetaFormer, optionally with released or local weights.

    ``drop_path_rate=None`` uses the paper's training rate for this model (it has no effect in eval).
    ``features_only=True`` returns a ``MetaFormerFeatures`` backbone whose forward gives the stage maps
    at ``out_indices`` (default all four; negative indices count from the end); ``out_norm=True`` adds
    the official dense models' fresh GroupNorm per output. ``feature_cls="getter"`` instead wraps the
    classifier's ``forward_intermediates``, as timm's does, and ``feature_cls="fx"`` returns the
    backbone as a ``torch.fx.GraphModule`` (same parameter names; scriptable); ``feature_cfg`` takes
    the same options as a dict (timm's spelling). ``global_pool=""`` builds a head that keeps the map
    unpooled.
    Overrides are any ``MetaFormerConfig`` field (``mixers``, ``norms``, ``act``, ``final_norm``...).
    Every model carries ``pretrained_cfg`` (timm's keys: preprocessing, input and pooled sizes,
    first conv and classifier names), so ``timm.data.resolve_data_config(model=m)`` gives ours.
    """
    variant = get_variant(name)
    if pretrained and checkpoint_path is not None:
        raise ConfigError("pass either pretrained=True or checkpoint_path, not both")
    features = _feature_options(
        feature_cfg, feature_cls=feature_cls, out_indices=out_indices, out_norm=out_norm
    )
    if not features_only and feature_cls is not None:
        raise ConfigError("feature_cls applies to features_only=True models; pass features_only=True too")
    rate = variant.drop_path_rate if drop_path_rate is None else drop_path_rate
    kwargs = model_kwargs(name, **overrides)
    kwargs.update(num_classes=0 if features_only else num_classes, in_chans=in_chans, drop_path_rate=rate)
    if global_pool != "avg":
        kwargs["global_pool"] = global_pool
    model: nn.Module = MetaFormer(**kwargs)
    model.pretrained_cfg.update(_preprocessing(get_variant_tag(name), model))
    model.model_name = name  # type: ignore[assignment]
    model.model_config = kwargs  # type: ignore[assignment]
    if features_only and features["feature_cls"] == "getter":
        if pretrained or checkpoint_path is not None:  # weights go into the classifier, then it is pruned
            _load(model, name, pretrained, checkpoint_path)
        getter = MetaFormerFeatureGetter(model, out_indices=features["out_indices"], norm=features["norm"])
        getter.pretrained_cfg = getter.default_cfg = model.pretrained_cfg  # type: ignore[assignment]
        getter.model_name = name  # type: ignore[assignment]
        return getter
    if features_only:  # wrap first, so a dense checkpoint's output norms load into out_norms
        norm = "groupnorm1" if features["out_norm"] is True else (features["out_norm"] or None)
        model = MetaFormerFeatures(model, out_indices=features["out_indices"], out_norm=norm)  # type: ignore[arg-type]
        model.model_name = name  # type: ignore[assignment]
        model.model_config = kwargs  # type: ignore[assignment]
    if pretrained or checkpoint_path is not None:
        _load(model, name, pretrained, checkpoint_path)
    if features_only and features["feature_cls"] == "fx":
        return trace_features(model)  # type: ignore[arg-type]
    return model


def _feature_options(feature_cfg: dict[str, Any] | None, **given: Any) -> dict[str, Any]:
    """timm's ``feature_cfg`` dict and the keyword arguments, merged (a keyword wins) and checked."""
    cfg = dict(feature_cfg or {})
    unknown = sorted(set(cfg) - set(FEATURE_CFG_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown feature_cfg key(s) {', '.join(unknown)}; valid keys are {', '.join(FEATURE_CFG_KEYS)}"
        )
    cfg.update({key: value for key, value in given.items() if value is not None})
    cfg.setdefault("feature_cls", "list")
    cfg.setdefault("out_indices", (0, 1, 2, 3))
    cfg.setdefault("out_norm", None)
    cfg.setdefault("norm", False)
    if cfg["feature_cls"] not in FEATURE_CLASSES:
        raise ConfigError(
            f"feature_cls must be one of {', '.join(FEATURE_CLASSES)}, got {cfg['feature_cls']!r} "
            "('list' returns MetaFormerFeatures, 'getter' wraps forward_intermediates, "
            "'fx' is MetaFormerFeatures as a torch.fx GraphModule)"
        )
    if cfg["feature_cls"] == "getter" and cfg["out_norm"]:  # the getter has no output norms
        raise ConfigError("out_norm adds norms to MetaFormerFeatures; use feature_cls='list' with it")
    return cfg


def get_variant_tag(name: str) -> str | None:
    """The tag of a model's default released weights, or None when it has none."""
    from metaformer.weights.pretrained import DEFAULT_TAGS

    return DEFAULT_TAGS.get(name)


def _preprocessing(tag: str | None, model: MetaFormer) -> dict[str, Any]:
    """The eval preprocessing of the weights ``tag`` names (timm's keys), else our default recipe.

    Without released weights the input size is the model's own; a tag brings its evaluation size.
    """
    from metaformer.weights.pretrained import DEFAULT_PREPROCESSING, get_weights

    if tag is None:
        return {**DEFAULT_PREPROCESSING, "input_size": model.pretrained_cfg["input_size"], "tag": None}
    record = get_weights(tag)
    cfg = {**DEFAULT_PREPROCESSING, **record.preprocessing(), "tag": record.tag.split(".", 1)[-1]}
    cfg["input_size"] = (model.in_chans, *cfg["input_size"][1:])
    cfg["num_classes"] = record.num_classes
    if model.pretrained_cfg["fixed_input_size"]:  # a fixed-grid model takes its own size only
        cfg["input_size"] = model.pretrained_cfg["input_size"]
    cfg["pool_size"] = stage_grid_sizes(cfg["input_size"][1:], len(model.stages))[-1]
    return cfg


def _load(model: nn.Module, name: str, pretrained: bool, checkpoint_path: str | Path | None) -> None:
    from metaformer.weights.loading import load_pretrained, load_weights

    if pretrained:
        load_pretrained(model, name)
    else:
        load_weights(model, checkpoint_path)  # type: ignore[arg-type]

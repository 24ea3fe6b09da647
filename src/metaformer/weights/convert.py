"""Whole models from weights files: rebuild the model a file came from (``model_from_weights``), convert a
checkpoint of any layout to ours (``convert_checkpoint``), and name the registered model a state dict
fits (``infer_model_name``). These build models by name, so they sit above ``models.factory``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaformer.errors import CheckpointError, ConfigError
from metaformer.models import VARIANTS, MetaFormer, MetaFormerFeatures, create_model
from metaformer.weights.folder import (
    is_metaformer_config,
    is_transformers_config,
    transformers_class_names,
    transformers_model,
    transformers_preprocessing,
    write_config,
)
from metaformer.weights.io import (
    FORMAT,
    WeightsMetadata,
    decode_metadata,
    read_checkpoint,
    read_folder_config,
    read_metadata,
    weights_file,
    write_weights,
)
from metaformer.weights.layouts import _OPENMMLAB_PARTS, _POOLFORMER_ONLY, detect_layout, to_ours
from metaformer.weights.loading import (
    _architecture,
    _mismatch_error,
    _num_classes,
    build_loaded,
    compare_state_dict,
    load_weights,
    matching_models,
)

logger = logging.getLogger(__name__)


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the config used (nested too; dicts are kept)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def model_from_weights(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Rebuild the model a ``save_weights`` file or ``save_pretrained`` folder came from, with its weights.

    Our files store the full ``MetaFormer`` keyword arguments, so ``MetaFormer(**config)`` rebuilds it
    exactly. A transformers ``save_pretrained`` folder is rebuilt from its config.json (model name from
    the depths and widths). ``overrides`` change any option (e.g. ``drop_path_rate=0.1`` to fine-tune,
    or ``num_classes=10``, which re-initialises the classifier). Returns a ``MetaFormer``, or a
    ``MetaFormerFeatures`` backbone when that is what was saved; ``model.class_names`` and
    ``model.preprocessing`` hold what the file recorded (None where it recorded nothing).
    """
    folder_config = read_folder_config(path)
    if is_transformers_config(folder_config):
        name, kwargs = transformers_model(folder_config, path)  # type: ignore[arg-type]
        model = create_model(name, **{**kwargs, **overrides})
        load_weights(model, path)
        model.class_names = transformers_class_names(folder_config)  # type: ignore[arg-type,assignment]
        model.preprocessing = transformers_preprocessing(path)  # type: ignore[assignment]
        return model
    if folder_config is not None and not is_metaformer_config(folder_config):
        raise CheckpointError(
            f"config.json in '{path}' is neither metaformer's nor a transformers PoolFormer's "
            f"(model_type {folder_config.get('model_type')!r}); build the model and call load_weights"
        )
    meta = folder_config if folder_config is not None else read_metadata(path)
    path = weights_file(path)
    preprocessing = meta.get("preprocessing")
    config = {k: _tuples(v) for k, v in (meta.get("config") or {}).items()}
    if not config:
        raise CheckpointError(
            f"'{path}' stores no model config; build the model yourself and call load_weights"
        )
    valid = set(inspect.signature(MetaFormer).parameters)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(
            f"unknown model option(s) {', '.join(unknown)}; valid options are {', '.join(sorted(valid))}"
        )
    config.update(overrides)
    features = meta.get("features")

    def build() -> nn.Module:
        model: nn.Module = MetaFormer(**{k: v for k, v in config.items() if k in valid})
        model.model_name = meta["model_name"]  # type: ignore[assignment]
        model.model_config = config  # type: ignore[assignment]
        if features:
            model = MetaFormerFeatures(model, features["out_indices"], features.get("out_norm"))
            model.model_name = meta["model_name"]  # type: ignore[assignment]
            model.model_config = config  # type: ignore[assignment]
        return model

    state, _ = read_checkpoint(path)
    try:
        model = build_loaded(build, state, "metaformer", str(path))
    except ConfigError as err:  # the stored options, refused by MetaFormer
        raise CheckpointError(
            f"the config stored in '{path}' cannot be rebuilt ({err}); build the model yourself and call "
            "load_weights"
        ) from None
    model.class_names = meta.get("class_names")  # type: ignore[assignment]
    model.preprocessing = preprocessing  # type: ignore[assignment]
    return model


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    model_name: str | None = None,
    to: str = "file",
) -> str:
    """Read a checkpoint file or folder of any layout in LAYOUTS, remap it and write ours.

    ``to="file"`` writes metaformer safetensors, ``to="folder"`` a ``save_pretrained`` folder. The model
    name is inferred when not given: from a transformers config.json, else by matching the key set and
    every shape against the model table. The classifier size and input channels are kept; a dense
    (mmdet / mmseg) checkpoint becomes a backbone with the output norms it has.
    Returns the model name written.
    """
    if to not in ("file", "folder"):
        raise ConfigError(f"unknown output kind '{to}'; choose 'file' or 'folder'")
    state, metadata = read_checkpoint(src)
    layout = detect_layout(state, metadata)
    state = to_ours(state, layout)
    folder_config = read_folder_config(src)
    class_names = None
    overrides: dict[str, Any] = {}
    stored: WeightsMetadata = {}
    if layout == "metaformer":
        stored = decode_metadata(metadata, src)
        model_name = model_name or stored.get("model_name") or None
        class_names = stored["class_names"]
    if layout == "transformers" and is_transformers_config(folder_config):
        name, overrides = transformers_model(folder_config, src)  # type: ignore[arg-type]
        model_name = model_name or name
        class_names = transformers_class_names(folder_config)  # type: ignore[arg-type]
        overrides.pop("in_chans")
        overrides.pop("num_classes", None)
    features = None
    if overrides.pop("features_only", False):
        features = {"out_indices": [0, 1, 2, 3], "out_norm": None}
    if layout == "mmdet_mmseg":
        parts = sorted({k.split(".", 1)[0] for k in state if k.startswith(_OPENMMLAB_PARTS)})
        if parts:
            logger.info(
                "%s: converting the backbone only; its %s weights are left out", src, ", ".join(parts)
            )
        state = {k: v for k, v in state.items() if not k.startswith(_OPENMMLAB_PARTS)}
        stages = sorted({int(k.split(".")[1]) for k in state if k.startswith("stage_norms.")})
        if not stages:
            raise CheckpointError(
                f"'{src}' has no output norms (backbone.norm0/2/4/6); pass a dense checkpoint's backbone"
            )
        features = {"out_indices": stages, "out_norm": "groupnorm1"}
        state = {_stage_norm_to_output(k, stages): v for k, v in state.items()}
    if model_name is None:
        backbone = {k: v for k, v in state.items() if not k.startswith("out_norms.")}
        model_name = infer_model_name(backbone, Path(src), pooling_only=layout in _POOLFORMER_ONLY)
    num_classes = _num_classes(state)
    in_chans = _architecture(state)[2] or 3
    with torch.device("meta"):
        if features:
            model = create_model(
                model_name,
                in_chans=in_chans,
                features_only=True,
                out_indices=features["out_indices"],
                out_norm=features["out_norm"] is not None,
                **overrides,
            )
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        else:
            model = create_model(model_name, num_classes=num_classes, in_chans=in_chans, **overrides)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if any(compare_state_dict(state, shapes)):
        raise _mismatch_error(state, shapes, model, layout, str(src))
    extra: dict[str, Any] = {"converted_from": Path(src).name, "source_layout": layout}
    kwargs = dict(
        model_name=model_name,
        config=model.model_config,  # type: ignore[arg-type]
        num_classes=0 if features else num_classes,
        class_names=class_names,
        features=features,
    )
    if to == "folder":
        from metaformer.weights.folder import WEIGHTS_NAME, default_preprocessing

        preprocessing = (
            stored.get("preprocessing")
            or (folder_config and transformers_preprocessing(src))
            or default_preprocessing(model)
        )
        write_weights(
            {k: state[k] for k in shapes},
            Path(dst) / WEIGHTS_NAME,
            metadata={**extra, "preprocessing": preprocessing},
            **kwargs,  # type: ignore[arg-type]
        )
        write_config(
            dst,
            {
                "format": FORMAT,
                "architecture": type(model).__name__,
                **kwargs,
                "preprocessing": preprocessing,
                **extra,
            },
        )
    else:
        write_weights({k: state[k] for k in shapes}, dst, metadata=extra, **kwargs)  # type: ignore[arg-type]
    logger.info("converted %s (%s layout) to %s as %s", src, layout, dst, model_name)
    return model_name


def _stage_norm_to_output(key: str, stages: list[int]) -> str:
    """``stage_norms.{s}.p`` -> ``out_norms.{position of s}.p``; other keys unchanged."""
    if not key.startswith("stage_norms."):
        return key
    _, stage, param = key.split(".", 2)
    return f"out_norms.{stages.index(int(stage))}.{param}"


def infer_model_name(state: Mapping[str, torch.Tensor], src: Path, *, pooling_only: bool = False) -> str:
    """The one registered model whose keys and shapes ``state`` (ours layout) has; the file name breaks
    ties between weight-free mixers, ``pooling_only`` keeps PoolFormers only."""
    candidates = matching_models(state)
    if pooling_only:
        candidates = [c for c in candidates if set(VARIANTS[c].config.mixers) == {"pooling"}]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        # Weight-free mixers (pooling, identity) make e.g. poolformerv2_s12 and identityformer_s12
        # indistinguishable; released files are named after their model, so let the file name decide
        # (OpenMMLab writes "poolformer-s12_...").
        file_name = src.name.replace("-", "_")
        named = [c for c in candidates if c in file_name]
        named = [c for c in named if not any(c != o and c in o for o in named)]
        if len(named) == 1:
            logger.info("the tensors fit %s; picked %s from the file name", ", ".join(candidates), named[0])
            return named[0]
        raise CheckpointError(
            f"the tensors in '{src}' fit {' and '.join(candidates)} equally (their mixers have no weights); "
            "pass the model name with --model / model_name="
        )
    dims, depths, _ = _architecture(state)
    raise CheckpointError(
        f"no registered model matches the tensors in '{src}' (dims {','.join(map(str, dims))}, depths "
        f"{','.join(map(str, depths))}); pass the model name with --model / model_name="
    )


__all__ = [
    "convert_checkpoint",
    "infer_model_name",
    "model_from_weights",
]

"""Hub-style folders: config.json plus one weights file, ours or HF transformers' ``save_pretrained``.

Ours (``save_pretrained``) holds config.json (format "metaformer": model name, the full MetaFormer
kwargs, class names, preprocessing) and model.safetensors with the same metadata, so the file alone
also rebuilds the model. A transformers folder's config.json is a ``PoolFormerConfig``; it names the
architecture, which the tensor shapes cannot (pooling and identity mixers have no weights), and the
labels. Nothing here downloads or imports a hub client: push or fetch a folder with the hub's own tool.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from metaformer.errors import CheckpointError
from metaformer.models.variants import VARIANTS
from metaformer.weights.io import (
    FOLDER_CONFIG,
    FORMAT,
    _unwrap_module,
    atomic_write,
    save_weights,
)

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers' hidden_act names -> ours (ACT2FN["gelu"] is the exact erf GELU, as nn.GELU).
_HF_ACTS = {"gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
# PoolFormerConfig fields with no counterpart in our config: only the values every PoolFormer uses load.
_HF_FIXED = {
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "padding": [2, 1, 1, 1],
    "num_encoder_blocks": 4,
}
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def is_transformers_config(config: Mapping[str, Any] | None) -> bool:
    return bool(config) and config.get("model_type") == "poolformer"  # type: ignore[union-attr]


def is_metaformer_config(config: Mapping[str, Any] | None) -> bool:
    return bool(config) and config.get("format") == FORMAT  # type: ignore[union-attr]


def transformers_model(config: Mapping[str, Any], source: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(model name, create_model keyword arguments) that a transformers ``PoolFormerConfig`` describes.

    The name is the PoolFormer v1 variant with the config's depths and widths; options the variant does
    not share (pool size, activation, no layer scale, input channels) become overrides; num_classes is
    ``len(id2label)``. A bare ``PoolFormerModel`` (no final norm, no classifier) is a backbone:
    ``features_only=True``, whose last output is its ``last_hidden_state``.
    """
    for key, value in _HF_FIXED.items():
        if key in config and config[key] != value:
            raise CheckpointError(
                f"config.json in '{source}' has {key}={config[key]}, but metaformer's PoolFormers use "
                f"{value}; this architecture cannot be rebuilt"
            )
    depths, dims = tuple(config.get("depths", ())), tuple(config.get("hidden_sizes", ()))
    names = [
        name
        for name, v in VARIANTS.items()
        if tuple(v.config.depths) == depths
        and tuple(v.config.dims) == dims
        and set(v.config.mixers) == {"pooling"}
        and set(v.config.norms) == {"groupnorm1"}
        and v.config.act == "gelu"
    ]
    if len(names) != 1:
        raise CheckpointError(
            f"config.json in '{source}' describes a PoolFormer with depths {list(depths)} and widths "
            f"{list(dims)}, which {'several' if names else 'no'} registered model(s) have; pass the model "
            "name to create_model with the matching depths= and dims="
        )
    act = str(config.get("hidden_act", "gelu"))
    if act not in _HF_ACTS:
        raise CheckpointError(
            f"config.json in '{source}' uses hidden_act={act!r}; metaformer supports {', '.join(_HF_ACTS)}"
        )
    kwargs: dict[str, Any] = {"in_chans": int(config.get("num_channels", 3))}
    if "PoolFormerModel" in (config.get("architectures") or []):  # no final norm, no classifier
        kwargs["features_only"] = True
    else:
        kwargs["num_classes"] = len(config.get("id2label") or {})
    if _HF_ACTS[act] != "gelu":
        kwargs["act"] = _HF_ACTS[act]
    pool = int(config.get("pool_size", 3))
    if pool != 3:
        kwargs["mixer_kwargs"] = ({"pool_size": pool},) * len(depths)
    if float(config.get("mlp_ratio", 4.0)) != 4.0:
        kwargs["mlp_ratio"] = float(config["mlp_ratio"])
    if config.get("use_layer_scale", True) is False:
        kwargs["layer_scale_init"] = None
    return names[0], kwargs


def check_transformers_config(config: Mapping[str, Any], model: nn.Module, source: str | os.PathLike) -> None:
    """Refuse a transformers folder whose weight-free options (mixer, pool size, activation) differ
    from ``model``'s: the shapes would fit, the outputs would not."""
    _, kwargs = transformers_model(config, source)
    ours = getattr(model, "model_config", None) or {}
    if not ours:
        return
    name = getattr(model, "model_name", None) or type(model).__name__
    pool = kwargs.get("mixer_kwargs", ({},))[0].get("pool_size", 3)
    act = kwargs.get("act", "gelu")
    checks = [
        ("pooling mixers", set(ours.get("mixers", ("pooling",))) == {"pooling"}, "pass a poolformer_* name"),
        (
            f"pool size {pool}",
            all(k.get("pool_size", 3) == pool for k in ours.get("mixer_kwargs", ({},))),
            f"pass mixer_kwargs={{'pool_size': {pool}}}",
        ),
        (f"activation {act}", ours.get("act", "gelu") == act, f"pass act='{act}'"),
    ]
    for want, ok, fix in checks:
        if not ok:
            raise CheckpointError(
                f"config.json in '{source}' describes {want}, which {name} does not have; {fix}"
            )


def transformers_class_names(config: Mapping[str, Any]) -> list[str] | None:
    """id2label in index order; None for transformers' placeholder names (LABEL_0, LABEL_1, ...)."""
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def transformers_preprocessing(folder: str | os.PathLike) -> dict[str, Any] | None:
    """timm-style eval preprocessing from a folder's preprocessor_config.json (PoolFormerImageProcessor)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        proc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("ignoring unreadable %s", path)
        return None
    size = proc.get("crop_size") or proc.get("size") or {}
    if isinstance(size, dict):
        side = size.get("height") or size.get("shortest_edge") or 224
    else:
        side = int(size)
    return {
        "input_size": [3, int(side), int(side)],
        "mean": list(proc.get("image_mean", IMAGENET_MEAN)),
        "std": list(proc.get("image_std", IMAGENET_STD)),
        "crop_pct": float(proc.get("crop_pct") or 0.9),
        "interpolation": _PIL_RESAMPLE.get(int(proc.get("resample", 3)), "bicubic"),
    }


def default_preprocessing(model: nn.Module) -> dict[str, Any]:
    """The released weights' eval transform for this model name, else ImageNet's at the model's size."""
    from metaformer.weights.pretrained import DEFAULT_TAGS, PRETRAINED

    tag = DEFAULT_TAGS.get(str(getattr(model, "model_name", "")))
    if tag and PRETRAINED[tag].num_classes == getattr(model, "num_classes", None):
        return dict(PRETRAINED[tag].preprocessing())
    img_size = tuple(getattr(model, "img_size", (224, 224)))
    return {
        "input_size": [int(getattr(model, "in_chans", 3)), *map(int, img_size)],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def write_config(folder: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """config.json of one of our folders, written atomically."""
    with atomic_write(Path(folder) / FOLDER_CONFIG) as tmp:
        tmp.write_text(json.dumps(_jsonable(config), indent=2) + "\n", encoding="utf-8")


def save_pretrained(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors``; ``create_model(name,
    checkpoint_path=folder)`` and ``model_from_weights(folder)`` read it back. Returns the folder.

    ``class_names`` defaults to the model's ``class_names`` attribute (set by ``model_from_weights``),
    ``preprocessing`` to the released weights' eval transform for this model name.
    """
    model = _unwrap_module(model)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"'{folder}' is a file; save_pretrained writes a folder, so pass a folder path")
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    preproc = dict(preprocessing or getattr(model, "preprocessing", None) or default_preprocessing(model))
    save_weights(model, folder / WEIGHTS_NAME, class_names=class_names, metadata={"preprocessing": preproc})
    features = None
    if hasattr(model, "out_indices") and hasattr(model, "out_norms"):
        features = {"out_indices": list(model.out_indices), "out_norm": getattr(model, "out_norm", None)}
    write_config(
        folder,
        {
            "format": FORMAT,
            "architecture": type(model).__name__,
            "model_name": str(getattr(model, "model_name", "") or ""),
            "num_classes": getattr(model, "num_classes", 0),
            "class_names": list(class_names) if class_names is not None else None,
            "preprocessing": preproc,
            "features": features,
            "config": getattr(model, "model_config", None) or {},
        },
    )
    logger.info("saved %s to %s", getattr(model, "model_name", type(model).__name__), folder)
    return folder


__all__ = [
    "WEIGHTS_NAME",
    "check_transformers_config",
    "default_preprocessing",
    "is_metaformer_config",
    "is_transformers_config",
    "save_pretrained",
    "transformers_class_names",
    "transformers_model",
    "transformers_preprocessing",
    "write_config",
]

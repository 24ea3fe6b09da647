"""Loading a classifier for eval and predict: from our weights, a hub-style folder, an official or timm
checkpoint, or a release; its class names and eval transform."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from metaformer.errors import CheckpointError, ConfigError
from metaformer.models import create_model, get_variant


def _checkpoint_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("head.fc.weight", "head.fc.fc2.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def _imagenet_names(num_classes: int) -> list[str]:
    """WordNet ids (the ImageNet folder names) for 1000-class weights, else class indices."""
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_label_name(i) for i in range(1000)]
    return [str(i) for i in range(num_classes)]


def _readable_names(names: Sequence[str]) -> list[str]:
    """ImageNet wnids -> 'goldfish'; other names unchanged."""
    if len(names) == 1000 and names[0].startswith("n0"):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    return list(names)


def load_classifier(
    checkpoint: str | None = None, model: str | None = None, pretrained: bool = False
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """(eval-mode model, class names, eval preprocessing) from our weights, another checkpoint or a release,
    or an exported folder (its model run by its runtime: ``deploy.package.FolderModel``).

    Our safetensors carry model, config, class names and preprocessing. Official and timm checkpoints
    need ``model``; they use the released weights' eval transform (the paper's: 224, crop 0.9/0.95).
    """
    from metaformer.weights import (
        detect_layout,
        get_weights,
        load_weights,
        model_from_weights,
        read_checkpoint,
        read_metadata,
        to_ours,
    )

    if (checkpoint is None) == (not pretrained):
        raise ConfigError("pass --checkpoint PATH or --pretrained (one of them)")
    if model is not None:
        get_variant(model)
    default_preproc = {
        "input_size": [3, 224, 224],
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    if pretrained:
        if model is None:
            raise ConfigError("--pretrained needs --model NAME")
        net = create_model(model, pretrained=True)
        return net.eval(), _imagenet_names(net.num_classes), get_weights(model).preprocessing()
    path = Path(str(checkpoint))
    from metaformer.deploy.package import is_export_folder, load_folder

    if is_export_folder(path):  # a folder `metaformer export` wrote: its runtime runs it, no torch weights
        exported = load_folder(path)
        return exported, exported.class_names, dict(exported.manifest["preprocessing"])
    if path.is_dir():  # a hub-style folder (save_pretrained, ours or transformers'): config.json says all
        net = model_from_weights(path)
        if model is not None and getattr(net, "model_name", model) != model:
            raise CheckpointError(
                f"'{path}' holds {net.model_name} weights but --model is {model}; drop --model or pass "
                f"--model {net.model_name}"
            )
        if getattr(net, "num_classes", 0) == 0:
            raise CheckpointError(f"'{path}' is a backbone without a classifier; pass a classification model")
        names = getattr(net, "class_names", None) or _imagenet_names(net.num_classes)
        preproc = getattr(net, "preprocessing", None) or default_preproc
        return net.eval(), list(names), dict(preproc)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist; check the path")
    state, raw_meta = read_checkpoint(path)
    if raw_meta.get("format") == "metaformer":
        meta = read_metadata(path)
        if model is not None and meta["model_name"] and meta["model_name"] != model:
            raise CheckpointError(
                f"'{path}' holds {meta['model_name']} weights but --model is {model}; drop --model or pass "
                f"--model {meta['model_name']}"
            )
        net = model_from_weights(path)
        if getattr(net, "num_classes", 0) == 0:
            raise CheckpointError(
                f"'{path}' is a backbone without a classifier; pass a classification checkpoint"
            )
        names = meta.get("class_names") or _imagenet_names(net.num_classes)
        return net.eval(), list(names), dict(meta.get("preprocessing") or default_preproc)
    if model is None:
        raise ConfigError(
            f"'{path}' is not a metaformer weights file, so the model is unknown; pass --model NAME"
        )
    num_classes = _checkpoint_classes(to_ours(state, detect_layout(state, raw_meta)))
    if not num_classes:
        raise CheckpointError(f"'{path}' has no classifier weights; pass a classification checkpoint")
    net = create_model(model, num_classes=num_classes)
    load_weights(net, path)
    preproc = default_preproc
    try:
        record = get_weights(model)
        if record.num_classes == num_classes:
            preproc = record.preprocessing()
    except KeyError:  # no released weights for this model: timm's default eval transform
        pass
    return net.eval(), _imagenet_names(num_classes), dict(preproc)

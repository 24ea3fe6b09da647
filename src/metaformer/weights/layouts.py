"""Checkpoint key layouts: detect official / timm / ours, remap to ours, check keys and shapes, load.

Layouts (PAPER.md 3.2-3.5):

- ``"official"``: sail-sg/poolformer v1 (``patch_embed.proj``, a flat ``network`` list whose entries
  are stages, downsamples and, in the hybrid ablations, position embeddings; ``norm``; ``head``).
- ``"official_baselines"``: sail-sg/metaformer (``downsample_layers.i``, ``stages.i.j``, channels-last
  ``Linear`` weights that become 1x1 convs in our NCHW stages; ``norm``; ``head``).
- ``"timm"``: timm's ``metaformer.py`` names, which are ours.
- ``"metaformer"``: our safetensors files (timm names plus metadata to rebuild the model).
- ``"transformers"``: HF transformers ``PoolFormerForImageClassification`` / ``PoolFormerModel``
  (``poolformer.encoder.patch_embeddings.i.projection``, ``poolformer.encoder.block.i.j.*``, ``norm``,
  ``classifier``); its head is GroupNorm on the map then the mean, our ``final_norm="map"``.
- ``"mmpretrain"``: mmpretrain classifiers (the official v1 names under ``backbone.``, the last stage's
  norm named after its network index, ``backbone.norm6``, and ``head.fc``).
- ``"mmdet_mmseg"``: the official detection / segmentation checkpoints (mmdet v2, mmseg v0.x): the v1
  backbone under ``backbone.`` with one output norm per stage, ``backbone.norm0/2/4/6`` (RetinaNet files
  have no ``norm0``: it was an Identity under ``FORK_LAST3=1``), plus ``neck.*`` and head keys.
  Output norms map to ``stage_norms.{stage}``, which a ``MetaFormerFeatures`` backbone loads into the
  ``out_norms`` of its ``out_indices``.

Renaming is a short table of regex -> template pairs applied to parsed indices, never chained string
replacement (``network.1`` is a prefix of ``network.10``).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaformer.errors import CheckpointError, ConfigError
from metaformer.models import VARIANTS, MetaFormer, MetaFormerFeatures, create_model
from metaformer.weights.folder import (
    check_transformers_config,
    is_metaformer_config,
    is_transformers_config,
    transformers_class_names,
    transformers_model,
    transformers_preprocessing,
    write_config,
)
from metaformer.weights.io import (
    FORMAT,
    read_checkpoint,
    read_folder_config,
    read_metadata,
    weights_file,
    write_weights,
)

logger = logging.getLogger(__name__)

LAYOUTS = (
    "metaformer",
    "timm",
    "official",
    "official_baselines",
    "transformers",
    "mmpretrain",
    "mmdet_mmseg",
)
Rules = tuple[tuple[re.Pattern[str], str], ...]


def _rules(*pairs: tuple[str, str]) -> Rules:
    return tuple((re.compile(pattern), template) for pattern, template in pairs)


# Official PoolFormer v1 -> ours. {stage} is derived from the parsed network index (see _v1_stages).
_V1_TO_OURS = _rules(
    (r"patch_embed\.proj\.(?P<p>weight|bias)", "stem.conv.{p}"),
    (r"network\.(?P<net>\d+)\.(?P<block>\d+)\.layer_scale_(?P<n>[12])",
     "stages.{stage}.blocks.{block}.layer_scale{n}.scale"),
    (r"network\.(?P<net>\d+)\.(?P<block>\d+)\.(?P<rest>.+)", "stages.{stage}.blocks.{block}.{rest}"),
    (r"network\.(?P<net>\d+)\.proj\.(?P<p>weight|bias)", "stages.{stage}.downsample.conv.{p}"),
    (r"network\.(?P<net>\d+)\.pos_embed", "stages.{stage}.pos_embed"),
    (r"norm\.(?P<p>weight|bias)", "head.norm.{p}"),
    (r"head\.(?P<p>weight|bias)", "head.fc.{p}"),
)  # fmt: skip
# Ours -> official v1 (the exact inverse). {net} is derived from (stage, part) (see _v1_network_indices).
_OURS_TO_V1 = _rules(
    (r"stem\.conv\.(?P<p>weight|bias)", "patch_embed.proj.{p}"),
    (r"stages\.(?P<stage>\d+)\.(?P<part>blocks)\.(?P<block>\d+)\.layer_scale(?P<n>[12])\.scale",
     "network.{net}.{block}.layer_scale_{n}"),
    (r"stages\.(?P<stage>\d+)\.(?P<part>blocks)\.(?P<block>\d+)\.(?P<rest>.+)",
     "network.{net}.{block}.{rest}"),
    (r"stages\.(?P<stage>\d+)\.(?P<part>downsample)\.conv\.(?P<p>weight|bias)", "network.{net}.proj.{p}"),
    (r"stages\.(?P<stage>\d+)\.(?P<part>pos_embed)", "network.{net}.pos_embed"),
    (r"head\.norm\.(?P<p>weight|bias)", "norm.{p}"),
    (r"head\.fc\.(?P<p>weight|bias)", "head.{p}"),
)  # fmt: skip
# Official MetaFormer baselines (sail-sg/metaformer) <-> ours.
_BASELINES_TO_OURS = _rules(
    (r"downsample_layers\.0\.conv\.(?P<p>weight|bias)", "stem.conv.{p}"),
    (r"downsample_layers\.0\.post_norm\.(?P<p>weight|bias)", "stem.norm.{p}"),
    (r"downsample_layers\.(?P<stage>\d+)\.conv\.(?P<p>weight|bias)", "stages.{stage}.downsample.conv.{p}"),
    (
        r"downsample_layers\.(?P<stage>\d+)\.pre_norm\.(?P<p>weight|bias)",
        "stages.{stage}.downsample.norm.{p}",
    ),
    (r"stages\.(?P<stage>\d+)\.(?P<block>\d+)\.(?P<rest>.+)", "stages.{stage}.blocks.{block}.{rest}"),
    (r"norm\.(?P<p>weight|bias)", "head.norm.{p}"),
    (r"head\.(?P<rest>.+)", "head.fc.{rest}"),
)
_OURS_TO_BASELINES = _rules(
    (r"stem\.conv\.(?P<p>weight|bias)", "downsample_layers.0.conv.{p}"),
    (r"stem\.norm\.(?P<p>weight|bias)", "downsample_layers.0.post_norm.{p}"),
    (r"stages\.(?P<stage>\d+)\.downsample\.conv\.(?P<p>weight|bias)", "downsample_layers.{stage}.conv.{p}"),
    (
        r"stages\.(?P<stage>\d+)\.downsample\.norm\.(?P<p>weight|bias)",
        "downsample_layers.{stage}.pre_norm.{p}",
    ),
    (r"stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.(?P<rest>.+)", "stages.{stage}.{block}.{rest}"),
    (r"head\.norm\.(?P<p>weight|bias)", "norm.{p}"),
    (r"head\.fc\.(?P<rest>.+)", "head.{rest}"),
)
# HF transformers PoolFormer -> ours (``poolformer.`` is absent in a bare PoolFormerModel's files).
_HF = r"(?:poolformer\.)?encoder\."
_TRANSFORMERS_TO_OURS = _rules(
    (_HF + r"patch_embeddings\.0\.projection\.(?P<p>weight|bias)", "stem.conv.{p}"),
    (_HF + r"patch_embeddings\.(?P<stage>\d+)\.projection\.(?P<p>weight|bias)",
     "stages.{stage}.downsample.conv.{p}"),
    (_HF + r"block\.(?P<stage>\d+)\.(?P<block>\d+)\.before_norm\.(?P<p>weight|bias)",
     "stages.{stage}.blocks.{block}.norm1.{p}"),
    (_HF + r"block\.(?P<stage>\d+)\.(?P<block>\d+)\.after_norm\.(?P<p>weight|bias)",
     "stages.{stage}.blocks.{block}.norm2.{p}"),
    (_HF + r"block\.(?P<stage>\d+)\.(?P<block>\d+)\.output\.conv(?P<n>[12])\.(?P<p>weight|bias)",
     "stages.{stage}.blocks.{block}.mlp.fc{n}.{p}"),
    (_HF + r"block\.(?P<stage>\d+)\.(?P<block>\d+)\.layer_scale_(?P<n>[12])",
     "stages.{stage}.blocks.{block}.layer_scale{n}.scale"),
    (r"norm\.(?P<p>weight|bias)", "head.norm.{p}"),
    (r"classifier\.(?P<p>weight|bias)", "head.fc.{p}"),
)  # fmt: skip
_HF_SENTINEL = re.compile(_HF + r"patch_embeddings\.0\.projection\.weight")
# Keys of the necks and heads around an OpenMMLab backbone (not backbone weights).
_OPENMMLAB_PARTS = ("neck.", "bbox_head.", "rpn_head.", "roi_head.", "decode_head.", "auxiliary_head.")
_MM_NORM = re.compile(r"norm(?P<net>\d+)\.(?P<p>weight|bias)")
# Channels-last Linear weights of the baselines that are 1x1 convs in our NCHW (non-attention) stages.
_POINTWISE = re.compile(r"stages\.(?P<stage>\d+)\.blocks\.\d+\.(mlp\.fc[12]|token_mixer\.pwconv[12])\.weight")
_ATTENTION = re.compile(r"stages\.(?P<stage>\d+)\.blocks\.\d+\.token_mixer\.qkv\.weight")
_NET_BLOCK = re.compile(r"network\.(\d+)\.\d+\.")
_NET_ANY = re.compile(r"network\.(\d+)\.")


def _rename(
    state: Mapping[str, torch.Tensor], rules: Rules, indices: Callable[[dict[str, str]], dict[str, int]]
) -> dict[str, torch.Tensor]:
    """Apply the first matching rule to each key; keys no rule matches pass through unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, template in rules:
            match = pattern.fullmatch(key)
            if match:
                groups = match.groupdict()
                new = template.format(**groups, **indices(groups))
                break
        if new in out:
            raise CheckpointError(
                f"checkpoint keys '{key}' and another both map to '{new}'; the file is malformed"
            )
        out[new] = value
    return out


def _v1_stages(state: Mapping[str, torch.Tensor]) -> dict[int, int]:
    """network index -> stage: entries holding blocks are stages 0, 1, ... in order; a downsample or
    position embedding belongs to the stage whose blocks follow it."""
    block_entries = sorted({int(m.group(1)) for k in state if (m := _NET_BLOCK.match(k))})
    entries = sorted({int(m.group(1)) for k in state if (m := _NET_ANY.match(k))})
    return {net: sum(b < net for b in block_entries) for net in entries}


def _v1_network_indices(state: Mapping[str, torch.Tensor]) -> dict[tuple[int, str], int]:
    """(stage, part) -> network index, in the official order: downsample, position embedding, blocks."""
    parts = set()
    for key in state:
        match = re.match(r"stages\.(\d+)\.(downsample|pos_embed|blocks)\b", key)
        if match:
            parts.add((int(match.group(1)), match.group(2)))
    order = {"downsample": 0, "pos_embed": 1, "blocks": 2}
    return {part: net for net, part in enumerate(sorted(parts, key=lambda p: (p[0], order[p[1]])))}


def remap_official_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official PoolFormer v1 (and hybrid ablation) keys -> ours; shapes are unchanged."""
    stage_of = _v1_stages(state)
    return _rename(state, _V1_TO_OURS, lambda g: {"stage": stage_of[int(g["net"])]} if "net" in g else {})


def to_official_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> official PoolFormer v1 keys (the inverse of ``remap_official_keys``)."""
    net_of = _v1_network_indices(state)
    return _rename(
        state, _OURS_TO_V1, lambda g: {"net": net_of[(int(g["stage"]), g["part"])]} if "part" in g else {}
    )


def _attention_stages(state: Mapping[str, torch.Tensor]) -> set[int]:
    return {int(m["stage"]) for k in state if (m := _ATTENTION.fullmatch(k))}


def remap_baselines_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sail-sg/metaformer keys -> ours; Linear [out, in] becomes a 1x1 conv [out, in, 1, 1] in NCHW stages."""
    out = _rename(state, _BASELINES_TO_OURS, lambda g: {})
    attention = _attention_stages(out)
    for key, value in out.items():
        match = _POINTWISE.fullmatch(key)
        if match and int(match["stage"]) not in attention and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def to_baselines_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> sail-sg/metaformer keys (inverse of ``remap_baselines_keys``: 1x1 convs back to Linear)."""
    out = {}
    for key, value in state.items():
        if _POINTWISE.fullmatch(key) and value.ndim == 4:
            value = value.flatten(1)
        out[key] = value
    return _rename(out, _OURS_TO_BASELINES, lambda g: {})


def remap_transformers_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF transformers PoolFormer keys -> ours; shapes are unchanged (its MLP is 1x1 convs too)."""
    return _rename(state, _TRANSFORMERS_TO_OURS, lambda g: {})


def _mm_backbone(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the ``backbone.`` keys without the prefix, every other key)."""
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    return backbone, rest


def _mm_norm_indices(backbone: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({int(m["net"]) for k in backbone if (m := _MM_NORM.fullmatch(k))})


def remap_mmpretrain_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmpretrain PoolFormer classifier keys -> ours: ``backbone.norm{last}`` is the final norm."""
    backbone, rest = _mm_backbone(state)
    norms = _mm_norm_indices(backbone)
    last = max(_v1_stages(backbone), default=-1)
    renamed = {}
    for key, value in backbone.items():
        match = _MM_NORM.fullmatch(key)
        if match and int(match["net"]) == last:
            key = f"norm.{match['p']}"
        renamed[key] = value
    if norms and norms != [last]:  # dense output norms in a classifier: leave them to the strict check
        logger.debug("mmpretrain checkpoint with output norms at network indices %s", norms)
    out = remap_official_keys(renamed)
    for key, value in rest.items():  # head.fc.* is already our name; anything else is reported unexpected
        if key in out:
            raise CheckpointError(
                f"checkpoint key '{key}' appears twice after remapping; the file is malformed"
            )
        out[key] = value
    return out


def remap_mmdet_mmseg_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official dense-model keys -> ours: backbone as official v1, ``norm{2s}`` -> ``stage_norms.{s}``.

    Neck and head keys (``neck.*``, ``bbox_head.*``, ``decode_head.*``...) pass through unchanged.
    """
    backbone, rest = _mm_backbone(state)
    stage_of = _v1_stages({k: v for k, v in backbone.items() if not _MM_NORM.fullmatch(k)})
    renamed, norms = {}, {}
    for key, value in backbone.items():
        match = _MM_NORM.fullmatch(key)
        if match:
            net = int(match["net"])
            if net not in stage_of or stage_of[net] != net // 2 or net % 2:
                raise CheckpointError(
                    f"checkpoint key 'backbone.{key}' is an output norm at network index {net}, which is not "
                    "a stage; expected norm0/norm2/norm4/norm6"
                )
            norms[f"stage_norms.{stage_of[net]}.{match['p']}"] = value
        else:
            renamed[key] = value
    return {**remap_official_keys(renamed), **norms, **rest}


def detect_layout(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """One of LAYOUTS, from safetensors metadata or sentinel keys (as timm's checkpoint_filter_fn does)."""
    if metadata and metadata.get("format") == FORMAT:
        return "metaformer"
    if "stem.conv.weight" in state:
        return "timm"
    if "backbone.patch_embed.proj.weight" in state:
        backbone, rest = _mm_backbone(state)
        norms = _mm_norm_indices(backbone)
        last = max(_v1_stages(backbone), default=-1)
        dense = any(k.startswith(_OPENMMLAB_PARTS) for k in rest) or (norms and norms != [last])
        return "mmdet_mmseg" if dense and "head.fc.weight" not in state else "mmpretrain"
    if "patch_embed.proj.weight" in state or any(k.startswith("network.") for k in state):
        return "official"
    if "downsample_layers.0.conv.weight" in state:
        return "official_baselines"
    if any(_HF_SENTINEL.fullmatch(k) for k in state):
        return "transformers"
    first = ", ".join(list(state)[:3])
    raise CheckpointError(
        f"unrecognised checkpoint layout (first keys: {first}); expected official PoolFormer "
        "(patch_embed.*, network.*), MetaFormer-baselines (downsample_layers.*), timm (stem.conv.*), "
        "transformers (poolformer.encoder.*) or OpenMMLab (backbone.patch_embed.*) keys"
    )


def to_ours(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "official":
        return remap_official_keys(state)
    if layout == "official_baselines":
        return remap_baselines_keys(state)
    if layout == "transformers":
        return remap_transformers_keys(state)
    if layout == "mmpretrain":
        return remap_mmpretrain_keys(state)
    if layout == "mmdet_mmseg":
        return remap_mmdet_mmseg_keys(state)
    return dict(state)


def rename_keys(
    state: Mapping[str, torch.Tensor], pairs: tuple[tuple[str, str], ...]
) -> dict[str, torch.Tensor]:
    """Rename keys by (regex, template) pairs, first full match wins; keys no pair matches pass through."""
    return _rename(state, _rules(*pairs), lambda g: {})


def compare_state_dict(
    state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """Missing, unexpected and wrong-shape keys of ``state`` against the model's expected shapes."""
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    mismatched = [k for k in state if k in shapes and tuple(state[k].shape) != tuple(shapes[k])]
    return missing, unexpected, mismatched


@dataclass
class LoadReport:
    """What ``load_weights`` did beyond a plain strict load.

    missing: model keys left as initialised (new ``out_norms``, a re-initialised classifier);
    unexpected: checkpoint keys not used (the head, for a backbone or a model with num_classes=0);
    mismatched: checkpoint classifier keys whose shape differed from the model's.
    """

    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    reinitialized_classifier: bool = False


def _num_classes(state: Mapping[str, torch.Tensor]) -> int:
    for key in ("head.fc.weight", "head.fc.fc2.weight"):
        if key in state:
            return int(state[key].shape[0])
    return 0


def _architecture(state: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(dims, depths, in_chans) read from the shapes of an ours-layout state dict."""
    dims, depths = {}, {}
    for key, value in state.items():
        if key == "stem.conv.weight":
            dims[0] = int(value.shape[0])
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.conv\.weight", key):
            dims[int(m.group(1))] = int(value.shape[0])
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key):
            stage, block = int(m.group(1)), int(m.group(2))
            depths[stage] = max(depths.get(stage, 0), block + 1)
    stem = state.get("stem.conv.weight")
    num_stages = max([*dims, *depths], default=-1) + 1
    return (
        tuple(dims.get(i, 0) for i in range(num_stages)),
        tuple(depths.get(i, 0) for i in range(num_stages)),
        int(stem.shape[1]) if stem is not None else 0,
    )


@functools.lru_cache(maxsize=64)
def _variant_shapes(name: str, num_classes: int, in_chans: int) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a registered model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_chans=in_chans)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def matching_models(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered model names whose state dict has exactly the keys and shapes of ``state`` (ours layout).

    Several names can match: mixers without weights (pooling, identity) leave no trace in a checkpoint.
    """
    dims, depths, in_chans = _architecture(state)
    has_head = any(k.startswith("head.") for k in state)
    backbone = {k: v for k, v in state.items() if not k.startswith("out_norms.")}
    names = []
    for name, variant in VARIANTS.items():
        if tuple(variant.config.dims) != dims or tuple(variant.config.depths) != depths:
            continue
        shapes = _variant_shapes(name, _num_classes(state), in_chans or 3)
        if not has_head:
            shapes = {k: s for k, s in shapes.items() if not k.startswith("head.")}
        if not any(compare_state_dict(backbone, shapes)):
            names.append(name)
    return names


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _span(values: tuple[int, ...]) -> str:
    return f"{values[0]}..{values[-1]}" if values else "none"


def _guess_fix(state: Mapping[str, torch.Tensor], model: nn.Module, layout: str = "") -> str:
    """A likely cause and fix for a checkpoint that does not fit ``model``."""
    dims, depths, in_chans = _architecture(state)
    model_dims = tuple(getattr(model, "dims", ()) or ())
    model_depths = tuple(getattr(model, "depths", ()) or ())
    if not model_dims:  # a MetaFormerFeatures backbone: read the wrapped stages' shapes
        model_dims, model_depths, _ = _architecture(model.state_dict())
    model_in = getattr(model, "in_chans", in_chans)
    if any(k.startswith("stage_norms.") for k in state) and not isinstance(model, MetaFormerFeatures):
        return (
            "it is a detection/segmentation backbone (output norms norm0/2/4/6, no classifier): load it "
            "with create_backbone(...) or create_model(..., features_only=True, out_norm=True)"
        )
    state = {k: v for k, v in state.items() if not k.startswith("stage_norms.")}
    candidates = [n for n in matching_models(state) if n != getattr(model, "model_name", None)]
    if layout in _POOLFORMER_ONLY:
        candidates = [n for n in candidates if set(VARIANTS[n].config.mixers) == {"pooling"}]
    candidates = candidates[:3]
    guess = f"a {' or '.join(candidates)} checkpoint? pass the matching model name" if candidates else ""
    if in_chans and in_chans != model_in:
        return (
            f"the checkpoint takes {in_chans} input channels and the model {model_in}: "
            f"pass in_chans={in_chans}"
        )
    if dims and model_dims and len(dims) != len(model_dims):
        return f"the checkpoint has {len(dims)} stages and the model {len(model_dims)}: " + (
            guess or "rebuild the model the checkpoint was saved from"
        )
    if dims and model_dims and dims != model_dims:
        size = {96: "an M-size", 64: "an S-size", 128: "a B-size"}.get(dims[0], "a different-size")
        return f"checkpoint dims {_span(dims)} but model dims {_span(model_dims)}: " + (
            guess or f"{size} checkpoint? pass the matching model name"
        )
    if depths and model_depths and depths != model_depths:
        return (
            f"checkpoint depths {','.join(map(str, depths))} but model depths "
            f"{','.join(map(str, model_depths))}: " + (guess or "pass the matching model name")
        )
    if guess:
        return f"the tensors look like {guess}"
    return (
        "the checkpoint comes from a model with other options (mixers, norms, head); build the model it was "
        "saved from (model_from_weights does this for metaformer files)"
    )


def _mismatch_error(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    model: nn.Module,
    layout: str,
    source: str,
) -> CheckpointError:
    """One sentence: counts and first few missing / unexpected / wrong-shape keys, and a guessed fix."""
    missing, unexpected, mismatched = compare_state_dict(state, shapes)
    if isinstance(model, MetaFormerFeatures):
        missing = [k for k in missing if not k.startswith("out_norms.")]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if mismatched:
        shown = ", ".join(f"{k} {list(state[k].shape)} vs {list(shapes[k])}" for k in mismatched[:3])
        more = ", ..." if len(mismatched) > 3 else ""
        parts.append(f"{len(mismatched)} with the wrong shape ({shown}{more})")
    name = getattr(model, "model_name", None) or type(model).__name__
    return CheckpointError(
        f"checkpoint '{source}' ({layout} layout) does not fit {name}: {', '.join(parts)} keys; "
        f"{_guess_fix(state, model, layout)}"
    )


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], layout: str, source: str) -> LoadReport:
    """Check keys and shapes of an ours-layout state dict against ``model``, then load it."""
    name = getattr(model, "model_name", None) or type(model).__name__
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = LoadReport(layout=layout)
    tolerated: set[str] = set()

    def drop(keep: Callable[[str], bool]) -> None:
        for key in [k for k in state if not keep(k)]:
            report.unexpected.append(key)
            del state[key]

    if layout == "mmdet_mmseg":
        parts = sorted({k.split(".", 1)[0] for k in state if k.startswith(_OPENMMLAB_PARTS)})
        drop(lambda k: not k.startswith(_OPENMMLAB_PARTS))
        if parts:
            logger.info(
                "%s: using the backbone only; its %s weights are not loaded", source, ", ".join(parts)
            )
    if isinstance(model, MetaFormerFeatures):
        num_stages = len(model.stages)
        _place_stage_norms(model, state, report, source)
        drop(lambda k: not k.startswith("head.") and not _stage_at_least(k, num_stages))
        tolerated = {k for k in shapes if k.startswith("out_norms.")}  # fresh layers of the backbone
    elif not any(k.startswith("head.fc.") for k in shapes):  # num_classes == 0
        drop(lambda k: not k.startswith("head.fc."))

    missing, unexpected, mismatched = compare_state_dict(state, shapes)
    missing = [k for k in missing if k not in tolerated]
    problems = missing + unexpected + mismatched
    classifier_only = (
        problems
        and isinstance(model, MetaFormer)
        and model.num_classes > 0
        and all(k.startswith("head.fc.") for k in problems)
    )
    if problems and not classifier_only:
        raise _mismatch_error(state, shapes, model, layout, source)
    if classifier_only:
        ckpt_classes = _num_classes(state)
        model.reset_classifier(model.num_classes)
        for key in unexpected + mismatched:
            del state[key]
        report.reinitialized_classifier = True
        report.mismatched = mismatched
        report.unexpected += unexpected
        what = f"{ckpt_classes} classes" if ckpt_classes else "no classifier"
        logger.warning("checkpoint has %s, model has %d: classifier re-initialised", what, model.num_classes)
    result = model.load_state_dict(state, strict=False)
    report.missing = sorted(result.missing_keys)
    expected_missing = set(missing) | tolerated | (set(mismatched) if classifier_only else set())
    if result.unexpected_keys or not set(result.missing_keys) <= expected_missing:
        raise CheckpointError(  # cannot happen after the checks above unless the model changed underneath
            f"loading '{source}' into {name} left keys unloaded ({_first(sorted(result.missing_keys))}); "
            "report this as a bug"
        )
    logger.info("loaded %s (%s layout) into %s", source, layout, name)
    return report


def _place_stage_norms(
    model: MetaFormerFeatures, state: dict[str, torch.Tensor], report: LoadReport, source: str
) -> None:
    """Move a dense checkpoint's ``stage_norms.{s}`` onto the ``out_norms`` of the backbone's outputs.

    A norm for a stage the backbone does not output is reported and logged, never dropped silently; an
    output with no norm in the checkpoint (stage 0 of a RetinaNet file) keeps its fresh init, logged too.
    """
    found = {int(m.group(1)) for k in state if (m := re.match(r"stage_norms\.(\d+)\.", k))}
    if not found:
        return
    has_norms = model.out_norm is not None
    for key in [k for k in state if k.startswith("stage_norms.")]:
        _, stage, param = key.split(".", 2)
        value = state.pop(key)
        if has_norms and int(stage) in model.out_indices:
            state[f"out_norms.{model.out_indices.index(int(stage))}.{param}"] = value
        else:
            report.unexpected.append(key)
    unused = sorted(found - set(model.out_indices)) if has_norms else sorted(found)
    if unused:
        why = "the backbone has no output norms (pass out_norm=True)" if not has_norms else "not an output"
        logger.warning(
            "%s: output norms of stage(s) %s are not loaded (%s)", source, ", ".join(map(str, unused)), why
        )
    fresh = sorted(set(model.out_indices) - found) if has_norms else []
    if fresh:
        logger.warning(
            "%s has no output norm for stage(s) %s (a RetinaNet checkpoint: FORK_LAST3 made norm0 an "
            "Identity); those norms keep their fresh init",
            source,
            ", ".join(map(str, fresh)),
        )


def _stage_at_least(key: str, num_stages: int) -> bool:
    match = re.match(r"stages\.(\d+)\.", key)
    return bool(match) and int(match.group(1)) >= num_stages


def load_weights(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a checkpoint file or hub-style folder of any layout in LAYOUTS into ``model`` after a strict
    key-and-shape check.

    A classifier of another size is not an error: it is re-initialised (and logged). For a
    ``MetaFormerFeatures`` backbone the checkpoint's head is ignored and its ``out_norms`` load from a
    dense checkpoint's output norms, or keep their fresh init. A transformers folder's config.json must
    agree with the model on what the shapes cannot show (mixer, pool size, activation).
    """
    state, metadata = read_checkpoint(path)
    layout = detect_layout(state, metadata)
    folder_config = read_folder_config(path)
    if layout == "transformers" and is_transformers_config(folder_config):
        check_transformers_config(folder_config, model, path)  # type: ignore[arg-type]
    return _load_into(model, to_ours(state, layout), layout, str(path))


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
    if isinstance(preprocessing, str):
        preprocessing = json.loads(preprocessing)
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
    try:
        model: nn.Module = MetaFormer(**{k: v for k, v in config.items() if k in valid})
    except ConfigError as err:
        raise CheckpointError(
            f"the config stored in '{path}' cannot be rebuilt ({err}); build the model yourself and call "
            "load_weights"
        ) from None
    model.model_name = meta["model_name"]  # type: ignore[assignment]
    model.model_config = config  # type: ignore[assignment]
    features = meta.get("features")
    if features:
        model = MetaFormerFeatures(model, features["out_indices"], features.get("out_norm"))
        model.model_name = meta["model_name"]  # type: ignore[assignment]
        model.model_config = config  # type: ignore[assignment]
    state, _ = read_checkpoint(path)
    _load_into(model, state, "metaformer", str(path))
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
    if layout == "metaformer":
        model_name = model_name or metadata.get("model_name") or None
        class_names = json.loads(metadata.get("class_names") or "null")
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
            json.loads(metadata.get("preprocessing") or "null")
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


# Layouts only PoolFormer v1 is published in: a pooling mixer is implied, whatever the shapes allow.
_POOLFORMER_ONLY = ("transformers", "mmpretrain", "mmdet_mmseg")


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
    "LAYOUTS",
    "rename_keys",
    "remap_mmdet_mmseg_keys",
    "remap_mmpretrain_keys",
    "remap_transformers_keys",
    "LoadReport",
    "compare_state_dict",
    "convert_checkpoint",
    "detect_layout",
    "infer_model_name",
    "load_weights",
    "matching_models",
    "model_from_weights",
    "remap_baselines_keys",
    "remap_official_keys",
    "to_baselines_keys",
    "to_official_keys",
    "to_ours",
]

"""Checkpoint key layouts: detect official / timm / ours and remap to ours (loading.py checks and loads).

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

import logging
import re
from collections.abc import Callable, Mapping

import torch

from metaformer.errors import CheckpointError
from metaformer.weights.io import FORMAT

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
# Layouts only PoolFormer v1 is published in: a pooling mixer is implied, whatever the shapes allow.
_POOLFORMER_ONLY = ("transformers", "mmpretrain", "mmdet_mmseg")
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


__all__ = [
    "LAYOUTS",
    "detect_layout",
    "remap_baselines_keys",
    "remap_mmdet_mmseg_keys",
    "remap_mmpretrain_keys",
    "remap_official_keys",
    "remap_transformers_keys",
    "rename_keys",
    "to_baselines_keys",
    "to_official_keys",
    "to_ours",
]

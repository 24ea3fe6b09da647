"""Checkpoints: safe reading, layout detection and remapping, released weights and downloads.

The only package that opens tensor files (see io.py); ``metaformer.models`` never imports it at
module level (``create_model`` imports ``loading`` when asked for weights). Layers, lowest first: ``io``;
``layouts`` (key remapping) and ``pretrained`` (the release table); ``download``; ``folder``; ``loading``
(the strict check, ``load_weights``, ``load_pretrained``), which knows the model classes but not the
factory; ``convert`` (whole models by name), which sits above ``models.factory``.
"""

from metaformer.weights.convert import convert_checkpoint, infer_model_name, model_from_weights
from metaformer.weights.download import cache_dir, download_weights, sha256_of
from metaformer.weights.folder import save_pretrained
from metaformer.weights.io import (
    atomic_write,
    leftover_temp_files,
    load_state,
    read_checkpoint,
    read_metadata,
    read_state_dict,
    save_state,
    save_weights,
    write_weights,
)
from metaformer.weights.layouts import (
    LAYOUTS,
    detect_layout,
    remap_baselines_keys,
    remap_mmdet_mmseg_keys,
    remap_mmpretrain_keys,
    remap_official_keys,
    remap_transformers_keys,
    rename_keys,
    to_baselines_keys,
    to_official_keys,
    to_ours,
)
from metaformer.weights.loading import (
    LoadReport,
    compare_state_dict,
    load_pretrained,
    load_weights,
    matching_models,
)
from metaformer.weights.pretrained import (
    DEFAULT_TAGS,
    PRETRAINED,
    PretrainedWeights,
    get_weights,
    resolve_tag,
)

__all__ = [
    "DEFAULT_TAGS",
    "LAYOUTS",
    "PRETRAINED",
    "LoadReport",
    "PretrainedWeights",
    "atomic_write",
    "leftover_temp_files",
    "cache_dir",
    "compare_state_dict",
    "convert_checkpoint",
    "detect_layout",
    "download_weights",
    "get_weights",
    "infer_model_name",
    "load_pretrained",
    "load_state",
    "load_weights",
    "matching_models",
    "model_from_weights",
    "read_checkpoint",
    "read_metadata",
    "read_state_dict",
    "remap_baselines_keys",
    "remap_mmdet_mmseg_keys",
    "remap_mmpretrain_keys",
    "remap_official_keys",
    "remap_transformers_keys",
    "rename_keys",
    "resolve_tag",
    "save_pretrained",
    "save_state",
    "save_weights",
    "sha256_of",
    "to_baselines_keys",
    "to_official_keys",
    "to_ours",
    "write_weights",
]

"""Checkpoints: safe reading, layout detection and remapping, released weights and downloads.

The only package that opens tensor files (see io.py); ``metaformer.models`` never imports it at
module level (``create_model`` imports it when asked for weights).
"""

from metaformer.weights.download import cache_dir, download_weights, sha256_of
from metaformer.weights.folder import save_pretrained
from metaformer.weights.io import (
    atomic_write,
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
    LoadReport,
    compare_state_dict,
    convert_checkpoint,
    detect_layout,
    load_weights,
    matching_models,
    model_from_weights,
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
from metaformer.weights.pretrained import (
    DEFAULT_TAGS,
    PRETRAINED,
    PretrainedWeights,
    get_weights,
    load_pretrained,
    resolve_tag,
)

__all__ = [
    "DEFAULT_TAGS",
    "LAYOUTS",
    "PRETRAINED",
    "LoadReport",
    "PretrainedWeights",
    "atomic_write",
    "cache_dir",
    "compare_state_dict",
    "convert_checkpoint",
    "detect_layout",
    "download_weights",
    "get_weights",
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

"""MetaFormer models: imports torch and nothing else outside this package."""

from metaformer.models.factory import create_model, get_variant, list_models, model_kwargs
from metaformer.models.layers import ACTIVATIONS, NORMS
from metaformer.models.metaformer import MetaFormer, MetaFormerFeatures, stage_grid_sizes
from metaformer.models.mixers import MIXERS, register_mixer
from metaformer.models.variants import VARIANTS, MetaFormerConfig, Variant

__all__ = [
    "ACTIVATIONS",
    "MIXERS",
    "NORMS",
    "VARIANTS",
    "MetaFormer",
    "MetaFormerConfig",
    "MetaFormerFeatures",
    "Variant",
    "create_model",
    "get_variant",
    "list_models",
    "model_kwargs",
    "register_mixer",
    "stage_grid_sizes",
]

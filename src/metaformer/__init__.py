"""metaformer: the MetaFormer family of vision backbones (PoolFormer and successors)."""

from importlib.metadata import PackageNotFoundError, version

from metaformer.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DownloadError,
    ExportError,
    InputSizeError,
    MetaformerError,
    UnknownModelError,
)
from metaformer.models import MetaFormer, MetaFormerFeatures, create_model, list_models, register_mixer
from metaformer.models.fast import optimize_for_inference
from metaformer.weights import load_weights as load_checkpoint
from metaformer.weights import save_pretrained, save_weights

try:
    __version__ = version("metaformer")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DownloadError",
    "ExportError",
    "InputSizeError",
    "MetaFormer",
    "MetaFormerFeatures",
    "MetaformerError",
    "UnknownModelError",
    "__version__",
    "create_model",
    "list_models",
    "load_checkpoint",
    "optimize_for_inference",
    "register_mixer",
    "save_pretrained",
    "save_weights",
]

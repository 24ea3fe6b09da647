"""Our models in timm's registry, so ``timm.create_model("mf_poolformer_s12")`` and timm's scripts
(train.py, validate.py, benchmark.py) build them.

Each entry point only translates the name: it calls ``metaformer.create_model`` with the caller's
arguments, and the registered ``pretrained_cfg`` is the one our models carry. Blocks are registered
as leaves for timm's FX tracing: they choose a kernel by inspecting their input, so a traced graph
keeps each block whole and computes exactly what the eager model does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metaformer.errors import ConfigError
from metaformer.models import create_model, list_models
from metaformer.models.metaformer import MetaFormerBlock

DEFAULT_PREFIX = "mf_"
_REGISTERED: dict[str, str] = {}  # timm name -> our name
default_cfgs: dict[str, dict[str, Any]] = {}  # read by timm's register_model from this module


def _entrypoint(name: str, timm_name: str) -> Any:
    def build(
        pretrained: bool = False,
        pretrained_cfg: Any = None,
        pretrained_cfg_overlay: Any = None,
        cache_dir: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        if pretrained_cfg is not None or pretrained_cfg_overlay is not None or cache_dir is not None:
            raise ConfigError(
                f"{timm_name} takes its weights and preprocessing from metaformer; "
                "drop pretrained_cfg, pretrained_cfg_overlay and cache_dir"
            )
        return create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = timm_name
    build.__module__ = __name__
    build.__doc__ = f"metaformer's {name} (``metaformer.create_model({name!r}, ...)``)."
    return build


def register_timm_models(pattern: str = "*", prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Register our models matching ``pattern`` in timm's registry as ``prefix + name``; returns the
    timm names. Calling it again is harmless; a name timm already has from elsewhere is an error."""
    import timm.layers
    from timm.models import is_model, register_model

    if not prefix:
        raise ConfigError("prefix must not be empty: timm already registers models under our names")
    timm.layers.register_notrace_module(MetaFormerBlock)
    names = []
    for name in list_models(pattern):
        timm_name = prefix + name
        names.append(timm_name)
        if _REGISTERED.get(timm_name) == name:
            continue
        if is_model(timm_name):
            raise ConfigError(f"timm already has a model named '{timm_name}'; choose another prefix")
        with torch.device("meta"):  # the cfg needs the architecture, not allocated weights
            cfg = dict(create_model(name).pretrained_cfg)
        default_cfgs[timm_name] = {**cfg, "architecture": timm_name}
        register_model(_entrypoint(name, timm_name))
        _REGISTERED[timm_name] = name
    return names

"""The deployment backends by name: the ``Backend`` object that runs each, and which of them can run a
precision here.

Each backend is one ``base.Backend`` instance in its own module (``backend_torch.TORCH``,
``backend_onnxruntime.ONNXRUNTIME``, ``backend_openvino.OPENVINO``, ``backend_compile.COMPILE``);
``backend`` imports a module only when its backend is first asked for, so naming the backends (the
CLI's choices) imports none of them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from metaformer.errors import ConfigError

if TYPE_CHECKING:
    from metaformer.deploy.base import Backend

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "compile")
PRECISIONS = ("fp32", "bf16", "int8")
_REGISTRY = {  # name -> (module, the Backend object in it)
    "torch": ("metaformer.deploy.backend_torch", "TORCH"),
    "onnxruntime": ("metaformer.deploy.backend_onnxruntime", "ONNXRUNTIME"),
    "openvino": ("metaformer.deploy.backend_openvino", "OPENVINO"),
    "compile": ("metaformer.deploy.backend_compile", "COMPILE"),
}


def backend(name: str) -> Backend:
    """The backend called ``name`` (one of ``BACKENDS`` but auto)."""
    module, attribute = _REGISTRY[name]
    return getattr(importlib.import_module(module), attribute)


def runnable(name: str, precision: str) -> bool:
    """Whether backend ``name`` can run ``precision`` here (its extra installed, its CPU features)."""
    try:
        backend(name).check(precision)
    except (ConfigError, ImportError):
        return False
    return True


def candidates(precision: str) -> list[str]:
    """The backends that can run ``precision`` here, the default first. Not compile: it joins auto
    only when the announced work pays for its compile (``choice``)."""
    order = ("openvino", "onnxruntime") if precision == "int8" else ("torch", "onnxruntime", "openvino")
    return [name for name in order if runnable(name, precision)]


__all__ = ["BACKENDS", "PRECISIONS", "backend", "candidates", "runnable"]

"""The deployment backends by name: which module runs each, and which of them can run a precision here.

Each backend module (``backend_torch``, ``backend_onnxruntime``, ``backend_openvino``) has the one
interface ``base`` describes; ``backend_module`` returns it by name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from metaformer.errors import ConfigError

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
_MODULES = {
    "torch": "metaformer.deploy.backend_torch",
    "onnxruntime": "metaformer.deploy.backend_onnxruntime",
    "openvino": "metaformer.deploy.backend_openvino",
}


def backend_module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def _runnable(name: str, precision: str) -> bool:
    try:
        backend_module(name).check(precision)
    except (ConfigError, ImportError):
        return False
    return True


def candidates(precision: str) -> list[str]:
    """The backends that can run ``precision`` here, the default first."""
    order = ("openvino", "onnxruntime") if precision == "int8" else ("torch", "onnxruntime", "openvino")
    return [name for name in order if _runnable(name, precision)]


__all__ = ["BACKENDS", "PRECISIONS", "backend_module", "candidates"]

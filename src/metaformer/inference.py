"""Run a trained model for inference on the fastest backend and precision this machine has.

The public door to ``metaformer.deploy`` (where the backends, quantization and the artefact cache
live): ``prepare_for_inference(model, backend="auto", precision="fp32")`` returns a module to call on
image batches and the backend it chose. See ``metaformer.deploy`` for how ``auto`` decides.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metaformer.deploy import BACKENDS, PRECISIONS, build, prepare_for_inference
from metaformer.deploy.runtimes import available, onnxruntime_options


def onnxruntime_available() -> bool:
    return available("onnxruntime")


def openvino_available() -> bool:
    return available("openvino")


def to_onnxruntime(model: nn.Module, img_size: tuple[int, int], *, threads: int | None = None) -> Any:
    """``model`` exported (folded, dynamic batch, checked against PyTorch) and opened in onnxruntime."""
    return build(model, "onnxruntime", "fp32", img_size=img_size, threads=threads)


def __getattr__(name: str) -> Any:
    if name in ("OnnxRuntimeModel", "OpenVinoModel"):  # the runtime classes, imported on first use
        from metaformer.deploy import backend_onnxruntime, backend_openvino

        return getattr(backend_onnxruntime if name == "OnnxRuntimeModel" else backend_openvino, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "onnxruntime_available",
    "onnxruntime_options",
    "openvino_available",
    "prepare_for_inference",
    "to_onnxruntime",
]

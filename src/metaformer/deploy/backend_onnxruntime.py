"""The onnxruntime backend: our folded graph exported to ONNX, in fp32, or quantized to a QDQ int8 file.

fp32 is checked against PyTorch (max abs diff <= 1e-4 on batches of 2, 1 and 3) when it is exported.
int8 is onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, calibrated on the user's
images), checked by top-1 agreement with fp32 on held-out images. onnxruntime has no bf16 CPU kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from metaformer.deploy.base import Runner, check_int8
from metaformer.deploy.onnx_export import export_model
from metaformer.deploy.quantize import Calibration, quantize_qdq, require_calibration
from metaformer.deploy.runtimes import onnxruntime_session, require, threads_or_default
from metaformer.errors import ConfigError

NAME = "onnxruntime"
PRECISIONS = ("fp32", "int8")
ARTEFACT = {"fp32": "model.onnx", "int8": "model.int8.onnx"}


def check(precision: str) -> None:
    require(NAME)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"the onnxruntime backend runs fp32 and int8, not {precision}; use --backend torch or openvino"
        )


class OnnxRuntimeModel(Runner):
    """An onnxruntime session: (B, C, H, W) float tensor in, logits out."""

    def __init__(self, path: Path, *, threads: int | None = None, precision: str = "fp32"):
        super().__init__(NAME, precision, {"threads": threads_or_default(threads)})
        self.session = onnxruntime_session(path, threads)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": images})[0]


def export_fp32(model: nn.Module, example: torch.Tensor, path: Path, dynamic_size: bool = False) -> dict:
    size = tuple(example.shape[-2:])
    report = export_model(model, path, img_size=size, dynamic_batch=True, dynamic_size=dynamic_size)
    return {"max_abs_diff": report.max_abs_diff, "batches": list(report.checked_batches)}


def build(
    model: nn.Module,
    precision: str,
    example: torch.Tensor,
    *,
    threads: int | None = None,
    calibration: Calibration | None = None,
    folder: Path,
    dynamic_size: bool = False,
) -> OnnxRuntimeModel:
    """``dynamic_size``: the graph takes any image height and width (checked at two sizes)."""
    check(precision)
    fp32_path = folder / ARTEFACT["fp32"]
    check_fp32 = export_fp32(model, example, fp32_path, dynamic_size)
    if precision == "fp32":
        runner = OnnxRuntimeModel(fp32_path, threads=threads)
        runner.check = check_fp32
        return runner
    calibration = require_calibration(calibration)
    quantize_qdq(fp32_path, folder / ARTEFACT["int8"], calibration)
    fp32_path.unlink()
    runner = OnnxRuntimeModel(folder / ARTEFACT["int8"], threads=threads, precision="int8")
    runner.check = check_int8(runner, model, calibration)
    return runner


def load(folder: Path, precision: str, *, threads: int | None = None) -> OnnxRuntimeModel:
    return OnnxRuntimeModel(folder / ARTEFACT[precision], threads=threads, precision=precision)


__all__ = ["NAME", "PRECISIONS", "OnnxRuntimeModel", "build", "check", "load"]

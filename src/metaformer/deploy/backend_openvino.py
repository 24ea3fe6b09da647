"""The OpenVINO backend: our folded ONNX graph read by OpenVINO, in fp32, bf16 or int8 (NNCF).

The artefact is OpenVINO IR (``model.xml`` + ``model.bin``, weights kept in fp32, never compressed to
fp16). fp32 runs with ``INFERENCE_PRECISION_HINT=f32`` set explicitly (OpenVINO's default on a CPU
with native bf16 is bf16) and is checked against PyTorch to 1e-4 like onnxruntime's; bf16 runs with
the ``bf16`` hint, only on a CPU where OpenVINO has native bf16 (it would run f32 under a bf16 label
elsewhere), checked to bf16's precision; int8 is NNCF's post-training quantization calibrated on the
user's images, checked by top-1 agreement with fp32 on held-out images. Threads and the ``LATENCY``
hint come from ``runtimes.openvino_config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metaformer.deploy.base import Backend, Runner, check_int8, check_outputs
from metaformer.deploy.onnx_export import export_model
from metaformer.deploy.quantize import Calibration, quantize_openvino, require_calibration
from metaformer.deploy.runtimes import (
    openvino_compile,
    openvino_core,
    openvino_native_bf16,
    openvino_settings,
    require,
)
from metaformer.errors import ConfigError


class OpenVinoModel(Runner):
    """An OpenVINO model compiled for the CPU: (B, C, H, W) float tensor in, logits out."""

    def __init__(self, model: Any, precision: str, *, threads: int | None = None):
        compiled = openvino_compile(model, precision, threads)
        super().__init__("openvino", precision, openvino_settings(compiled))
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def run(self, images: np.ndarray) -> np.ndarray:
        self.request.infer({0: images})
        return self.request.get_output_tensor(0).data.copy()


def _save(model: Any, path: Path) -> None:
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=False)


class OpenVinoBackend(Backend):
    name = "openvino"
    precisions = ("fp32", "bf16", "int8")
    artefacts = {"fp32": "model.xml", "bf16": "model.xml", "int8": "model.int8.xml"}

    def check(self, precision: str) -> None:
        require(self.name)
        super().check(precision)
        if precision == "bf16" and not openvino_native_bf16():
            raise ConfigError(
                "OpenVINO runs bf16 only on a CPU with native bf16 (AVX512-BF16 or AMX), which this one "
                "lacks; use --backend torch for emulated bf16 or --precision fp32"
            )

    def build(
        self,
        model: nn.Module,
        precision: str,
        example: torch.Tensor,
        *,
        threads: int | None = None,
        calibration: Calibration | None = None,
        folder: Path,
        dynamic_size: bool = False,
        **_: object,
    ) -> OpenVinoModel:
        """``dynamic_size``: the graph takes any image height and width (checked at two sizes)."""
        self.check(precision)
        onnx_path = folder / "model.onnx"
        size = tuple(example.shape[-2:])
        export_model(model, onnx_path, img_size=size, dynamic_batch=True, dynamic_size=dynamic_size)
        if precision == "int8":
            calibration = require_calibration(calibration)
            ov_model = quantize_openvino(onnx_path, calibration)
        else:
            ov_model = openvino_core().read_model(str(onnx_path))
        _save(ov_model, folder / self.artefacts[precision])
        onnx_path.unlink()
        runner = self.load(folder, precision, threads=threads)
        if precision == "int8":
            runner.check = check_int8(runner, model, calibration)  # type: ignore[union-attr]
        else:
            runner.check = check_outputs(runner, model, example, precision, dynamic_size=dynamic_size)
        return runner

    def load(self, folder: Path, precision: str, *, threads: int | None = None) -> OpenVinoModel:
        return OpenVinoModel(
            openvino_core().read_model(str(folder / self.artefacts[precision])), precision, threads=threads
        )


OPENVINO = OpenVinoBackend()


__all__ = ["OPENVINO", "OpenVinoBackend", "OpenVinoModel"]

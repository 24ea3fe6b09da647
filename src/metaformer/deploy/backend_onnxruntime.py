"""The onnxruntime backend: our folded graph exported to ONNX, in fp32, or quantized to a QDQ int8 file.

fp32 is checked against PyTorch (max abs diff <= 1e-4 on batches of 2, 1 and 3) when it is exported.
int8 is onnxruntime's ``quantize_static`` (QDQ, calibrated on the user's images) in each of the
settings its guide offers (``quantize.QDQ_SETTINGS``: U8S8 per channel, with 7-bit weights, U8U8,
per tensor), because which one keeps the model's answers depends on the CPU: U8S8's kernels saturate
on x86-64 without VNNI. Each is measured here on the held-out images (top-1 agreement with fp32, and
time per batch); the file kept is the most faithful, the fastest of those within ``AGREEMENT_TIE`` of
it. The cache keeps that choice with the artefact (keyed by the CPU), and ``check`` records every
setting's figures. onnxruntime has no bf16 CPU kernels.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metaformer.deploy.base import Backend, Runner, check_int8
from metaformer.deploy.onnx_export import export_model
from metaformer.deploy.quantize import QDQ_SETTINGS, Calibration, quantize_qdq, require_calibration
from metaformer.deploy.runtimes import onnxruntime_session, require, threads_or_default

AGREEMENT_TIE = 0.005  # settings this close in held-out agreement to the best are equally faithful


class OnnxRuntimeModel(Runner):
    """An onnxruntime session: (B, C, H, W) float tensor in, logits out."""

    def __init__(self, path: Path, *, threads: int | None = None, precision: str = "fp32"):
        super().__init__("onnxruntime", precision, {"threads": threads_or_default(threads)})
        self.session = onnxruntime_session(path, threads)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": images})[0]


def export_fp32(model: nn.Module, example: torch.Tensor, path: Path, dynamic_size: bool = False) -> dict:
    size = tuple(example.shape[-2:])
    report = export_model(model, path, img_size=size, dynamic_batch=True, dynamic_size=dynamic_size)
    return {"max_abs_diff": report.max_abs_diff, "batches": list(report.checked_batches)}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    precisions = ("fp32", "int8")
    artefacts = {"fp32": "model.onnx", "int8": "model.int8.onnx"}

    instead = "use --backend torch or openvino"

    def check(self, precision: str) -> None:
        require(self.name)
        super().check(precision)

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
    ) -> OnnxRuntimeModel:
        """``dynamic_size``: the graph takes any image height and width (checked at two sizes)."""
        self.check(precision)
        fp32_path = folder / self.artefacts["fp32"]
        check_fp32 = export_fp32(model, example, fp32_path, dynamic_size)
        if precision == "fp32":
            runner = OnnxRuntimeModel(fp32_path, threads=threads)
            runner.check = check_fp32
            return runner
        calibration = require_calibration(calibration)
        runner = quantize_measured(model, fp32_path, folder, calibration, threads)
        fp32_path.unlink()
        return runner

    def load(self, folder: Path, precision: str, *, threads: int | None = None) -> OnnxRuntimeModel:
        return OnnxRuntimeModel(folder / self.artefacts[precision], threads=threads, precision=precision)


ONNXRUNTIME = OnnxRuntimeBackend()


def _ms_per_batch(runner: OnnxRuntimeModel, batch: torch.Tensor, rounds: int = 3) -> float:
    """The fastest of ``rounds`` runs on ``batch`` (after a warm-up), in milliseconds."""
    images = batch.numpy()
    runner.run(images)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        runner.run(images)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def quantize_measured(
    model: nn.Module, fp32_path: Path, folder: Path, calibration: Calibration, threads: int | None
) -> OnnxRuntimeModel:
    """The QDQ file of every ``QDQ_SETTINGS`` entry, measured here on the held-out images; the one kept
    (renamed to the int8 artefact) is the most faithful, the fastest of those within ``AGREEMENT_TIE``."""
    tried: dict[str, dict] = {}
    batch = next(iter(calibration.stacked(held_out=True)), None)
    for setting in QDQ_SETTINGS:
        path = folder / f"model.int8.{setting}.onnx"
        quantize_qdq(fp32_path, path, calibration, setting)
        runner = OnnxRuntimeModel(path, threads=threads, precision="int8")
        check = check_int8(runner, model, calibration)
        check["ms_per_batch"] = _ms_per_batch(runner, batch) if batch is not None else None
        tried[setting] = check
    best = max(check["agreement"] or 0.0 for check in tried.values())
    faithful = [name for name, check in tried.items() if (check["agreement"] or 0.0) >= best - AGREEMENT_TIE]
    chosen = min(faithful, key=lambda name: tried[name]["ms_per_batch"] or 0.0)
    for setting in QDQ_SETTINGS:
        path = folder / f"model.int8.{setting}.onnx"
        if setting == chosen:
            path.replace(folder / ONNXRUNTIME.artefacts["int8"])
        else:
            path.unlink()
    runner = ONNXRUNTIME.load(folder, "int8", threads=threads)
    runner.check = {**tried[chosen], "quantization": chosen, "settings": tried}
    return runner


__all__ = ["ONNXRUNTIME", "OnnxRuntimeBackend", "OnnxRuntimeModel", "quantize_measured"]

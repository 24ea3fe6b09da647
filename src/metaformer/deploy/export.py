"""``export_deployable``: the model file a user ships (ONNX, OpenVINO IR or TorchScript; fp32, bf16 or
int8), built and checked as the backends build and check theirs."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaformer.deploy import backends
from metaformer.deploy.backends import PRECISIONS
from metaformer.errors import ConfigError, check_choice

# what ``export_deployable`` writes: format -> precisions (OpenVINO IR carries bf16 as a run-time hint)
EXPORT_PRECISIONS = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8"), "torchscript": ("fp32",)}
FAST_RUNTIME = {
    ("onnx", "fp32"): "onnxruntime and OpenVINO run it",
    ("onnx", "int8"): "OpenVINO runs this QDQ file fast (int8 kernels); onnxruntime runs it, on the CPUs "
    "measured slower than its fp32 graph",
    ("openvino", "fp32"): "OpenVINO runs it (INFERENCE_PRECISION_HINT=f32 keeps it fp32)",
    ("openvino", "bf16"): "OpenVINO runs it in bf16 with INFERENCE_PRECISION_HINT=bf16",
    ("openvino", "int8"): "OpenVINO runs it (int8 kernels where the CPU has VNNI or AMX)",
    ("torchscript", "fp32"): "torch.jit.load runs it",
}


def export_deployable(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "onnx",
    precision: str = "fp32",
    img_size: tuple[int, int] = (224, 224),
    dynamic_batch: bool = True,
    fold: bool = True,
    calibration: Any = None,
) -> Any:
    """Write the file a user ships, checked like the backends check it: ONNX (fp32, or int8 QDQ from
    onnxruntime's quantizer), OpenVINO IR (``path`` is the .xml, the .bin goes beside it; fp32, bf16 or
    NNCF int8) or TorchScript. Returns an ``onnx_export.ExportReport``."""
    from metaformer.deploy.onnx_export import FORMATS, ExportReport, export_model
    from metaformer.deploy.quantize import as_calibration, require_calibration
    from metaformer.weights.io import atomic_write

    check_choice("export format", format, (*FORMATS, "openvino"))
    check_choice("precision", precision, PRECISIONS)
    if precision not in EXPORT_PRECISIONS[format]:
        raise ConfigError(
            f"--format {format} holds {' or '.join(EXPORT_PRECISIONS[format])}, not {precision}; "
            f"use --format {'openvino' if precision == 'bf16' else 'onnx or openvino'}"
        )
    size = (int(img_size[0]), int(img_size[1]))
    if format == "torchscript" or (format == "onnx" and precision == "fp32"):
        return export_model(model, path, format=format, img_size=size, dynamic_batch=dynamic_batch, fold=fold)
    backend = "onnxruntime" if format == "onnx" else "openvino"
    builder = backends.backend(backend)
    builder.check(precision)
    calibration = as_calibration(calibration)
    if precision == "int8":
        require_calibration(calibration)
    path = Path(path)
    start = time.perf_counter()
    example = torch.zeros(1, getattr(model, "in_chans", 3), *size)
    with tempfile.TemporaryDirectory(prefix="metaformer-export-") as tmp:
        runner = builder.build(
            model.eval().cpu().float(), precision, example, calibration=calibration, folder=Path(tmp)
        )
        artefact = Path(tmp) / str(builder.artefact(precision))
        pairs = [(artefact, path)]
        if format == "openvino":
            pairs.append((artefact.with_suffix(".bin"), path.with_suffix(".bin")))
        for source, target in reversed(pairs):  # the .xml last: it names a .bin that is already there
            with atomic_write(target) as out:
                shutil.copyfile(source, out)
    check = runner.check
    diff, batches = float(check.get("max_abs_diff", float("nan"))), tuple(check.get("batches", ()))
    return ExportReport(
        path, format, size, True, diff, batches, time.perf_counter() - start, precision,
        check.get("agreement"), int(check.get("images", 0)),
    )  # fmt: skip


__all__ = ["EXPORT_PRECISIONS", "FAST_RUNTIME", "export_deployable"]

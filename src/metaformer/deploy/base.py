"""What every backend hands back, and the checks an artefact passes before it is used.

A backend module (``backend_torch``, ``backend_onnxruntime``, ``backend_openvino``) has one interface:

- ``NAME`` and ``PRECISIONS`` (the precisions it can run);
- ``ARTEFACT``: precision -> the file it builds and caches (none for the PyTorch fast path);
- ``check(precision)``: ``ConfigError`` in one sentence when it cannot run ``precision`` here;
- ``build(model, precision, example, *, threads, calibration, folder) -> Runner``: the one-off work
  (export, quantize), written into ``folder``, checked against PyTorch, and the runner;
- ``load(folder, precision, *, threads) -> Runner``: the runner from a cached artefact.

A ``Runner`` is a module: (B, C, H, W) float images in, float logits out, whatever runs inside. Its
``settings`` say what it runs with (the OpenVINO hint, threads and performance hint), ``check`` how
it matched PyTorch when it was built.

The checks: fp32 outputs within 1e-4 (max absolute difference) of the PyTorch model on seeded random
batches; bf16 within bf16's precision (the largest difference at most ``BF16_RTOL`` of the largest
logit); int8 by top-1 agreement with fp32 on the calibration images (at least ``INT8_MIN_AGREEMENT``:
random inputs say nothing about a quantized model, whose ranges fit real images only).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from metaformer.errors import ExportError

FP32_ATOL = 1e-4
BF16_RTOL = 0.05  # bf16 keeps 8 significant bits (relative step 2^-8); a dozen blocks compound it
INT8_MIN_AGREEMENT = 0.5  # a floor against a broken quantization (near chance); eval reports the real one


class Runner(nn.Module):
    """A built model behind the module interface."""

    def __init__(self, backend: str, precision: str, settings: dict[str, Any] | None = None):
        super().__init__()
        self.backend, self.precision = backend, precision
        self.settings: dict[str, Any] = dict(settings or {})
        self.check: dict[str, Any] = {}
        self.register_buffer("device_anchor", torch.zeros(()), persistent=False)  # callers ask for a device

    def run(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - every runtime runner overrides it
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(np.asarray(self.run(images), dtype=np.float32))

    def describe(self) -> str:
        """ "openvino int8 (hint f32, 2 threads, LATENCY)"-style text for reports and benchmark rows."""
        parts = [f"hint {self.settings['hint']}"] if "hint" in self.settings else []
        if "threads" in self.settings:
            parts.append(f"{self.settings['threads']} threads")
        if "performance_hint" in self.settings:
            parts.append(str(self.settings["performance_hint"]))
        return f"{self.backend} {self.precision}" + (f" ({', '.join(parts)})" if parts else "")


def random_batches(example: torch.Tensor, sizes: Iterable[int] = (2, 1, 3)) -> list[torch.Tensor]:
    """Seeded random batches with ``example``'s image shape (the export check's inputs)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(b, *example.shape[1:], generator=generator) for b in sizes]


def check_outputs(
    runner: nn.Module, model: nn.Module, example: torch.Tensor, precision: str
) -> dict[str, Any]:
    """Compare ``runner`` with the fp32 PyTorch ``model`` on seeded random batches; ExportError when
    they differ by more than ``precision`` allows."""
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for x in random_batches(example):
            want = model(x).float()
            got = runner(x).float()
            if got.shape != want.shape:
                raise ExportError(
                    f"the {precision} model returns shape {tuple(got.shape)}, not {tuple(want.shape)}"
                )
            worst = max(worst, (got - want).abs().max().item())
            scale = max(scale, want.abs().max().item())
    allowed = FP32_ATOL if precision == "fp32" else BF16_RTOL * max(scale, 1e-6)
    if not worst <= allowed:
        raise ExportError(
            f"the {precision} model differs from PyTorch by up to {worst:.3g} (allowed {allowed:.3g}); "
            "use --backend torch"
        )
    return {"max_abs_diff": worst, "allowed": allowed, "batches": [2, 1, 3]}


def check_agreement(runner: nn.Module, model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, Any]:
    """Top-1 agreement of the int8 ``runner`` with the fp32 ``model`` on ``batches`` (calibration images)."""
    same = total = 0
    with torch.no_grad():
        for x in batches:
            same += int((runner(x).argmax(1) == model(x).argmax(1)).sum())
            total += x.shape[0]
    agreement = same / max(total, 1)
    if agreement < INT8_MIN_AGREEMENT:
        raise ExportError(
            f"the int8 model picks the fp32 model's class on only {100 * agreement:.1f}% of the "
            f"{total} calibration images; calibrate on more typical images or use --precision fp32"
        )
    return {"agreement": agreement, "images": total}


__all__ = ["BF16_RTOL", "FP32_ATOL", "INT8_MIN_AGREEMENT", "Runner", "check_agreement", "check_outputs"]

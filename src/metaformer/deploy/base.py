"""What every backend hands back, and the checks an artefact passes before it is used.

A backend is a ``Backend`` object (``backend_torch.TORCH``, ``backend_onnxruntime.ONNXRUNTIME``,
``backend_openvino.OPENVINO``; ``backends.backend(name)`` finds one by name) with one interface:

- ``name`` and ``precisions`` (the precisions it can run);
- ``artefact(precision)``: the file it builds and caches (None for the PyTorch fast path);
- ``check(precision)``: ``ConfigError`` in one sentence when it cannot run ``precision`` here;
- ``build(model, precision, example, *, threads, calibration, folder, ...) -> Runner``: the one-off
  work (export, quantize), written into ``folder``, checked against PyTorch, and the runner;
- ``load(folder, precision, *, threads) -> Runner``: the runner from a cached artefact;
- ``compiles``: its one-off cost is a ``torch.compile`` (``backend_compile.COMPILE``), whose caches
  Inductor keeps, under the deployment cache key ``build`` gets as ``key``.

A ``Runner`` is a module: (B, C, H, W) float images in, float logits out, whatever runs inside:
(B, K) for a classifier, (B, K, H, W) for a segmenter (whose exported graph takes any H and W,
``dynamic_size``). Its
``settings`` say what it runs with (the OpenVINO hint, threads and performance hint), ``check`` how
it matched PyTorch when it was built.

The checks: fp32 outputs within 1e-4 (max absolute difference) of the PyTorch model on seeded random
batches; bf16 within bf16's precision (the largest difference at most ``BF16_RTOL`` of the largest
logit); int8 by top-1 agreement with fp32 on the calibration source's held-out images (``agreement``:
random inputs say nothing about a quantized model, whose ranges fit real images only).

A model is ``foldable`` when a MetaFormer (or its feature backbone) is in it: a classifier, or a
Semantic FPN whose backbone is one. ``fold_inference`` swaps each for ``optimize_for_inference``'s
folded copy; the rest of the model (an FPN, a head) runs as it is.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from metaformer.deploy.agreement import measure_agreement
from metaformer.errors import ConfigError, ExportError
from metaformer.models.fast import optimize_for_inference
from metaformer.models.metaformer import MetaFormer, MetaFormerFeatures

FP32_ATOL = 1e-4
BF16_RTOL = 0.05  # bf16 keeps 8 significant bits (relative step 2^-8); a dozen blocks compound it


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


class Backend(ABC):
    """One way to run a model (see the module docstring); one instance per backend."""

    name: str = ""
    precisions: tuple[str, ...] = ()
    artefacts: Mapping[str, str] = {}  # precision -> the file ``build`` writes and the cache keeps
    compiles = False  # its one-off cost is a compile, cached by Inductor under a deployment cache key
    instead = ""  # what to use for a precision it lacks: the end of ``check``'s sentence

    def artefact(self, precision: str) -> str | None:
        """The file ``build`` writes for ``precision`` (None: nothing is written, nothing cached)."""
        return self.artefacts.get(precision)

    @property
    def caches_files(self) -> bool:
        """Whether ``build`` writes an artefact the deployment cache keeps (and ``load`` reads)."""
        return bool(self.artefacts)

    def check(self, precision: str) -> None:
        """``ConfigError`` in one sentence when this backend cannot run ``precision`` here (a backend
        whose runtime or CPU can lack something checks that too)."""
        if precision not in self.precisions:
            listed = " and ".join([", ".join(self.precisions[:-1]), self.precisions[-1]])
            end = f"; {self.instead}" if self.instead else ""
            raise ConfigError(f"the {self.name} backend runs {listed}, not {precision}{end}")

    @abstractmethod
    def build(self, model: nn.Module, precision: str, example: torch.Tensor, **options: Any) -> Runner:
        """The one-off work (export, quantize, fold), checked against PyTorch, and the runner."""

    def load(self, folder: Any, precision: str, *, threads: int | None = None) -> Runner:
        """The runner from the artefact a ``build`` left in ``folder``."""
        raise ConfigError(f"the {self.name} backend caches nothing; build it instead")

    def __repr__(self) -> str:
        return f"<{self.name} backend>"


_BACKBONES = (MetaFormer, MetaFormerFeatures)


def foldable(model: nn.Module) -> bool:
    """Whether ``model`` is or holds a MetaFormer, which our fast path folds and the runtimes run."""
    return any(isinstance(module, _BACKBONES) for module in model.modules())


def fold_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every MetaFormer in it folded (``optimize_for_inference``);
    the input model is not changed."""
    if isinstance(model, _BACKBONES):
        return optimize_for_inference(model)
    fast = copy.deepcopy(model).eval()
    for module in list(fast.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, _BACKBONES):
                setattr(module, name, optimize_for_inference(child))
    return fast


def other_size(size: tuple[int, int]) -> tuple[int, int]:
    """A second input size, of another aspect ratio and not a multiple of 32, to check a graph whose
    height and width vary."""
    return size[0] + 8, size[1] + 40


def random_batches(
    example: torch.Tensor, sizes: Iterable[int] = (2, 1, 3), *, dynamic_size: bool = False
) -> list[torch.Tensor]:
    """Seeded random batches with ``example``'s image shape (the export check's inputs); with
    ``dynamic_size`` one more batch of 1 at ``other_size``."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, *example.shape[1:], generator=generator) for b in sizes]
    if dynamic_size:
        h, w = other_size((int(example.shape[-2]), int(example.shape[-1])))
        batches.append(torch.randn(1, example.shape[1], h, w, generator=generator))
    return batches


def check_outputs(
    runner: nn.Module, model: nn.Module, example: torch.Tensor, precision: str, *, dynamic_size: bool = False
) -> dict[str, Any]:
    """Compare ``runner`` with the fp32 PyTorch ``model`` on seeded random batches (and another size
    with ``dynamic_size``); ExportError when they differ by more than ``precision`` allows."""
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for x in random_batches(example, dynamic_size=dynamic_size):
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


def check_int8(runner: nn.Module, model: nn.Module, calibration: Any) -> dict[str, Any]:
    """What an int8 ``runner`` records when it is built: its agreement with the fp32 ``model`` on the
    calibration set's held-out images, and how many images it was calibrated on."""
    check = measure_agreement(runner, model, calibration.stacked(held_out=True))
    check["calibrated_on"] = len(calibration.calibration_images())
    return check


__all__ = [
    "BF16_RTOL",
    "Backend",
    "FP32_ATOL",
    "Runner",
    "check_int8",
    "check_outputs",
    "fold_inference",
    "foldable",
    "other_size",
]

"""The PyTorch backend: our fast path (``optimize_for_inference``), in fp32 or bf16.

bf16 folds the model in fp32 first (norm affines, layer scales and StarReLU's scale multiply into the
weights at full precision) and only then casts the folded weights to bf16, so the one rounding is
the final one; inputs go in as bf16 and logits come back as fp32. On a CPU without native bf16
(no AVX512-BF16 or AMX) oneDNN emulates it many times slower than fp32: one warning sentence says so.
int8 is not offered here: PyTorch's int8 CPU path (PT2E) runs fast only through ``torch.compile``'s
Inductor, whose start-up costs minutes; the runtimes run the same quantization at once.
Nothing is cached: folding takes a fraction of a second.
"""

from __future__ import annotations

import torch
from torch import nn

from metaformer.deploy.base import Backend, Runner, fold_inference, foldable
from metaformer.models.hardware import native_bf16, warn_emulated_bf16


class TorchRunner(Runner):
    """The folded model, with bf16 inputs and fp32 outputs when it runs in bf16."""

    def __init__(self, model: nn.Module, precision: str, threads: int | None = None):
        super().__init__("torch", precision, {"threads": threads or torch.get_num_threads()})
        self.model = model
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x.to(self.dtype))
        return out.float() if isinstance(out, torch.Tensor) else [o.float() for o in out]


def fold(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """The fast path of ``model`` (its MetaFormer folded in fp32), cast to bf16 for ``precision="bf16"``."""
    fast = fold_inference(model.float()) if foldable(model) else model.float().eval()
    if precision == "bf16":
        if not native_bf16(next(model.parameters()).device):
            warn_emulated_bf16()
        fast = fast.to(torch.bfloat16)
    return fast


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32", "bf16")

    instead = "use --backend openvino (or auto) for int8"

    def build(
        self,
        model: nn.Module,
        precision: str,
        example: torch.Tensor,
        *,
        threads: int | None = None,
        calibration: object = None,
        folder: object = None,
        one_batch: bool = False,
        dynamic_size: bool = False,
        **_: object,
    ) -> TorchRunner:
        """``one_batch``: the caller runs a single batch (one image to predict), where folding (a copy
        of every weight) costs more than the faster forward saves: fp32 then runs the model as it is.
        ``dynamic_size`` changes nothing: PyTorch takes any input size."""
        self.check(precision)
        if one_batch and precision == "fp32":
            runner = TorchRunner(model.float().eval(), precision, threads)
            runner.settings["folded"] = False
            return runner
        return TorchRunner(fold(model, precision), precision, threads)


TORCH = TorchBackend()


__all__ = ["TORCH", "TorchBackend", "TorchRunner", "fold"]

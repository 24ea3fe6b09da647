"""The compile backend: our fast path (``optimize_for_inference``) compiled by Inductor with freezing,
in fp32 or bf16, run under ``torch.inference_mode``.

Freezing (``torch._inductor`` ``freezing``, as PyTorch's CPU inference guides recommend) turns the
weights into constants of the graph, so Inductor folds and pre-packs them. bf16 folds in fp32 and
casts the folded weights, as the torch backend does (``backend_torch.fold``).

The graph is compiled for one batch size (the caller's), so a smaller batch (a dataset's last one) is
padded to it and a larger one split: a new batch size would cost a second compile. With
``dynamic_size`` (a segmenter taking every image size) the height and width are dynamic in the graph;
the batch is still padded or split, so one graph serves every image.

Its one-off cost is the compile: minutes on a 2-core CPU when cold, seconds when Inductor's caches
(kept under the metaformer home by ``metaformer.compiling``, keyed like the deployment cache) are
warm. Freezing prepacks the weights for oneDNN, and Inductor's FX graph cache skips graphs holding
such (unpicklable) weights: a warm start lowers the graph again but reuses every compiled kernel, the
C++ compiles that make a cold start minutes long. ``building.one_off_s`` gives that cost before
compiling: the compile time recorded for the key, or ``COLD_COMPILE_S`` for a key never compiled here
(``WARM_COMPILE_S`` once it was).
"""

from __future__ import annotations

import torch
from torch import nn

from metaformer.deploy.backend_torch import fold
from metaformer.deploy.base import Backend, Runner, check_outputs

# PoolFormer-S12 at 224 px compiled with freezing on 2 cores of an AVX2 CPU took 178-187 s cold and
# 10 s with Inductor's caches warm: the costs assumed for a key never compiled here / compiled before
COLD_COMPILE_S = 180.0
WARM_COMPILE_S = 10.0


class CompiledRunner(Runner):
    """The compiled fast path: batches padded or split to the compiled batch size, bf16 inputs for bf16,
    fp32 logits out."""

    def __init__(
        self, compiled: nn.Module, precision: str, batch_size: int, *, dynamic: bool, threads: int | None
    ):
        settings = {"threads": threads or torch.get_num_threads(), "dynamic_size": dynamic}
        super().__init__("compile", precision, settings)
        self.model = compiled
        self.batch_size = int(batch_size)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # compile_module patches Inductor's freezing around the call
            return self.model(x.to(self.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.batch_size:
            out = self._run(x)
        else:  # the compiled batch size: a smaller batch padded with zeros, a larger one split
            parts = []
            for chunk in x.split(self.batch_size):
                n = chunk.shape[0]
                padded = torch.cat([chunk, chunk.new_zeros(self.batch_size - n, *chunk.shape[1:])])
                parts.append(self._run(padded)[:n])
            out = torch.cat(parts)
        # inference tensors cannot be changed in place outside inference mode: the caller gets a plain one
        return out.float().clone()


class CompileBackend(Backend):
    name = "compile"
    precisions = ("fp32", "bf16")
    compiles = True

    instead = "use --backend openvino (or auto) for int8"

    def build(
        self,
        model: nn.Module,
        precision: str,
        example: torch.Tensor,
        *,
        key: str,
        threads: int | None = None,
        dynamic_size: bool = False,
        **_: object,
    ) -> CompiledRunner:
        """Compile (or load from Inductor's caches, for ``key``) the fast path of ``model`` for
        ``example``'s batch size, and check it against the fp32 model as the runtimes are checked.
        ``settings`` record the compile's seconds and whether the caches had it."""
        from metaformer.compiling import compile_module

        self.check(precision)
        fast = fold(model.eval(), precision)
        compiled = compile_module(fast, key=key, freezing=True, dynamic=dynamic_size)
        runner = CompiledRunner(compiled, precision, example.shape[0], dynamic=dynamic_size, threads=threads)
        generator = torch.Generator().manual_seed(0)
        runner(torch.randn(example.shape, generator=generator))  # the compile itself
        runner.settings.update(
            freezing=True,
            compiled=bool(getattr(compiled, "compiled", True)),
            compile_s=getattr(compiled, "compile_seconds", None),
            cache_hit=bool(getattr(compiled, "cache_hit", False)),
        )
        runner.check = check_outputs(runner, model.float(), example, precision, dynamic_size=dynamic_size)
        return runner


COMPILE = CompileBackend()


__all__ = ["COLD_COMPILE_S", "COMPILE", "WARM_COMPILE_S", "CompileBackend", "CompiledRunner"]

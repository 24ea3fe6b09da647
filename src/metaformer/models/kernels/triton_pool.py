"""Opt-in Triton path for a PoolFormer block's pooling half on CUDA (``METAFORMER_TRITON=1``).

The kernels (``triton_pool_kernels``) are wrapped as ``torch.library`` custom ops with fake
implementations and an autograd formula, so ``torch.compile``, ``torch.export`` and CUDA graphs see
one opaque op with known output shapes instead of breaking the graph. The path stays opt-in until it
is measured faster than timm on a GPU (``benchmarks/gpu_check.sh``). Triton is imported only when a
kernel first runs: without it, the package imports and every block keeps its torch ops.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
Triton is imported) and only inside ``triton_kernels(True, cpu=True)``: that is how the tests check
them on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SWITCH: list[bool | None] = [None]  # None: follow METAFORMER_TRITON
_CPU: list[bool] = [False]


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # it ships with torch's CUDA wheels


@contextlib.contextmanager
def triton_kernels(enabled: bool, *, cpu: bool = False) -> Iterator[None]:
    """Switch the Triton path on or off inside a block, whatever ``METAFORMER_TRITON`` says;
    ``cpu=True`` also runs it on CPU tensors (needs ``TRITON_INTERPRET=1``: tests only)."""
    previous = _SWITCH[0], _CPU[0]
    _SWITCH[0], _CPU[0] = enabled, cpu
    try:
        yield
    finally:
        _SWITCH[0], _CPU[0] = previous


def _switched_on() -> bool:
    if _SWITCH[0] is not None:
        return _SWITCH[0]
    return os.environ.get("METAFORMER_TRITON", "0") == "1"


def triton_supported(x: Tensor) -> bool:
    """Whether the Triton path takes this (B, C, H, W) map: switched on, a CUDA tensor (or a CPU one
    under the interpreter), fp32/bf16/fp16, and not inside TorchScript tracing or scripting (custom
    ops are fine for torch.compile and torch.export, not for the TorchScript/ONNX exporters)."""
    if not _switched_on() or x.dim() != 4 or x.dtype not in DTYPES:
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if x.device.type == "cpu":
        if not (_CPU[0] and os.environ.get("TRITON_INTERPRET") == "1"):
            return False
    elif x.device.type != "cuda":
        return False
    return TRITON_INSTALLED and OPS_REGISTERED


def _kernels():
    from metaformer.models.kernels import triton_pool_kernels

    return triton_pool_kernels


def _dense(x: Tensor) -> Tensor:
    """``x`` itself when it is contiguous in NCHW or channels-last (what the kernels address), else a copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty_like(x, dtype=dtype or x.dtype)


# --------------------------------------------------------------------------- custom ops
def _register_ops():
    """Define the custom ops: ``metaformer::pool_mix`` (with its autograd formula),
    ``metaformer::pool_mix_backward`` and ``metaformer::pool_mix_normed`` (inference)."""

    @torch.library.custom_op("metaformer::pool_mix", mutates_args=())
    def _pool_mix_op(
        x: Tensor,
        k: Tensor,
        bias: Tensor | None,
        multiplier: Tensor | None,
        radius: int,
        eps: float,
        out_dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """out = x + m * k * (avgpool(x) - x) / std(x); also the per-sample mean and rstd for backward."""
        kernels = _kernels()
        x = _dense(x)
        k = k.contiguous()
        mean, rstd = kernels.sample_stats(x, eps)
        out, _ = kernels.pool_mix_forward(x, k, multiplier, rstd, radius, out_dtype)
        return out, mean, rstd

    @_pool_mix_op.register_fake
    def _(x, k, bias, multiplier, radius, eps, out_dtype):
        b = x.shape[0]
        stats = x.new_empty(b, dtype=torch.float32)
        return _like(_dense(x), out_dtype), stats, stats.new_empty(b)

    @torch.library.custom_op("metaformer::pool_mix_backward", mutates_args=())
    def _pool_mix_backward_op(
        grad: Tensor,
        x: Tensor,
        k: Tensor,
        multiplier: Tensor | None,
        mean: Tensor,
        rstd: Tensor,
        radius: int,
    ) -> tuple[Tensor, Tensor]:
        """Gradients of ``metaformer::pool_mix`` for ``x`` (x's dtype) and ``k`` (k's dtype)."""
        x = _dense(x)
        dx, dk = _kernels().pool_mix_backward(grad, x, k.contiguous(), multiplier, mean, rstd, radius)
        return dx, dk.to(k.dtype)

    @_pool_mix_backward_op.register_fake
    def _(grad, x, k, multiplier, mean, rstd, radius):
        return _like(_dense(x)), _like(k)

    def _setup_context(ctx, inputs, output) -> None:
        x, k, bias, multiplier, radius, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, k, multiplier, mean, rstd)
        ctx.radius = radius
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad, _grad_mean, _grad_rstd):
        x, k, multiplier, mean, rstd = ctx.saved_tensors
        dx, dk = _pool_mix_backward_op(grad, x, k, multiplier, mean, rstd, ctx.radius)
        # the norm's bias cancels in pool(y) - y (a constant pools to itself): its gradient is exactly 0,
        # returned so that data-parallel training sees the parameter used
        dbias = torch.zeros_like(k) if ctx.has_bias else None
        return dx, dk, dbias, None, None, None, None

    _pool_mix_op.register_autograd(_backward, setup_context=_setup_context)

    @torch.library.custom_op("metaformer::pool_mix_normed", mutates_args=())
    def _pool_mix_normed_op(
        x: Tensor, k: Tensor, radius: int, eps: float, norm_eps: float
    ) -> tuple[Tensor, Tensor]:
        """Inference: ``y = x + k * (avgpool(x) - x) / std(x)`` and ``y`` normalised per sample (no affine),
        the second norm's input to the folded fc1; y's statistics come out of the same pass that writes y."""
        kernels = _kernels()
        x = _dense(x)
        _, rstd = kernels.sample_stats(x, eps)
        y, parts = kernels.pool_mix_forward(x, k.contiguous(), None, rstd, radius, x.dtype, out_stats=True)
        return y, kernels.normalize(y, parts, norm_eps)

    @_pool_mix_normed_op.register_fake
    def _(x, k, radius, eps, norm_eps):
        return _like(_dense(x)), _like(_dense(x))

    return _pool_mix_op, _pool_mix_normed_op


try:
    _pool_mix_op, _pool_mix_normed_op = _register_ops()
    OPS_REGISTERED = True
except (AttributeError, TypeError, ValueError, RuntimeError) as error:  # a torch without custom_op's needs
    logger.debug("Triton path unavailable: its custom ops could not be registered (%s)", error)
    OPS_REGISTERED = False


# --------------------------------------------------------------------------- public wrappers
def pool_mix_triton(
    x: Tensor,
    k: Tensor,
    *,
    radius: int,
    eps: float,
    bias: Tensor | None = None,
    multiplier: Tensor | None = None,
) -> Tensor:
    """A pooling block's first half ``x + m * ls * (pool(gn(x)) - gn(x))`` with ``k = ls * gn.weight``,
    differentiable in ``x`` and ``k`` (``bias`` gets a zero gradient, ``multiplier`` is stochastic
    depth's per-sample factor, shape (B,) or (B, 1, 1, 1)). The output dtype is what the torch ops
    give: fp32 under autocast (GroupNorm autocasts to fp32), else x's dtype."""
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.promote_types(x.dtype, torch.float32)
    mult = None if multiplier is None else multiplier.reshape(x.shape[0]).float()
    return _pool_mix_op(x, k.reshape(-1), bias, mult, radius, eps, out_dtype)[0]


def pool_mix_normed_triton(
    x: Tensor, scale: Tensor, radius: int, eps: float, norm_eps: float | None
) -> tuple[Tensor, Tensor | None]:
    """The fast path's ``pool_mix`` (same signature as the native kernel's): ``lerp(x, pool(x), scale
    / std(x))`` and, if ``norm_eps`` is given, that map normalised per sample."""
    k = scale.reshape(-1)
    if norm_eps is None:
        return _pool_mix_op(x, k, None, None, radius, eps, x.dtype)[0], None
    return _pool_mix_normed_op(x, k, radius, eps, norm_eps)

"""The native pooling-half kernels as custom ops, so that a compiled training graph runs them.

Inside ``torch.compile`` the ctypes kernels of ``models.kernels`` cannot be traced, and the blocks fell
back to torch ops that Inductor fuses itself. Measured on PoolFormer-S12's four stage shapes (batch 16,
224 px, channels-last, 2 threads, forward + backward), the native kernels took 0.36-0.43x the time of
Inductor's code for the same ops (40 ms against 103 ms a step over the 12 blocks), so a compiled graph
calls them as the opaque ops ``metaformer::native_pool_mix_train`` (and its backward), with fake
implementations for tracing. They take what the eager kernel takes: CPU fp32 channels-last maps.
Importing this module loads Dynamo, so ``metaformer.compiling`` imports it before compiling, and the
blocks find it in ``kernels.COMPILED_OPS``.
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import Tensor

from metaformer.models import kernels

logger = logging.getLogger(__name__)


def _forward(x: Tensor, k: Tensor, multiplier: Tensor | None, radius: int, eps: float):
    """The eager kernel's forward: y, and the per-sample mean and rstd."""
    return kernels.pool_mix_train_forward(x, k, multiplier, radius, eps)


def _backward(grad, x, k, multiplier, mean, rstd, radius):
    dx, dk = kernels.pool_mix_train_backward(grad, x, k, multiplier, mean, rstd, radius)
    return dx, dk.to(k.dtype)


def _channels_last_like(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.channels_last)


def _register_ops():
    @torch.library.custom_op("metaformer::native_pool_mix_train", mutates_args=())
    def forward_op(
        x: Tensor, k: Tensor, bias: Tensor | None, multiplier: Tensor | None, radius: int, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``x + m * k * (avgpool(x) - x) / std(x)`` per sample, and that sample's mean and rstd."""
        return _forward(x, k, multiplier, radius, eps)

    @forward_op.register_fake
    def _(x, k, bias, multiplier, radius, eps):
        b = x.shape[0]
        return _channels_last_like(x), x.new_empty(b), x.new_empty(b)

    @torch.library.custom_op("metaformer::native_pool_mix_train_backward", mutates_args=())
    def backward_op(
        grad: Tensor, x: Tensor, k: Tensor, multiplier: Tensor | None, mean: Tensor, rstd: Tensor, radius: int
    ) -> tuple[Tensor, Tensor]:
        """The gradients for ``x`` and ``k``."""
        return _backward(grad, x, k, multiplier, mean, rstd, radius)

    @backward_op.register_fake
    def _(grad, x, k, multiplier, mean, rstd, radius):
        return _channels_last_like(x), torch.empty_like(k)

    def setup_context(ctx, inputs, output) -> None:
        x, k, bias, multiplier, radius, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, k, multiplier, mean, rstd)
        ctx.radius, ctx.has_bias = radius, bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, grad, _grad_mean, _grad_rstd):
        x, k, multiplier, mean, rstd = ctx.saved_tensors
        dx, dk = backward_op(grad, x, k, multiplier, mean, rstd, ctx.radius)
        # GroupNorm's bias cancels in pool(y) - y: its gradient is exactly 0 (returned so that
        # data-parallel training sees the parameter used), as in the eager kernel
        dbias = torch.zeros_like(k) if ctx.has_bias else None
        return dx, dk, dbias, None, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op


try:
    _native_pool_mix_train_op = _register_ops()
    OPS_REGISTERED = True
except (AttributeError, TypeError, ValueError, RuntimeError) as error:  # a torch without custom_op's needs
    logger.debug("the native kernels stay out of compiled graphs: custom ops unavailable (%s)", error)
    OPS_REGISTERED = False


@torch.compiler.assume_constant_result
def _kernels_built() -> bool:
    """Whether the native library is switched on and built (called once while tracing, a constant there)."""
    return kernels._ENABLED[0] and kernels.native_library() is not None


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def takes(x: Tensor) -> bool:
    """Whether a compiled graph runs this map's pooling half through the custom op: compiling, CPU fp32
    channels-last, the ops registered and the kernels built."""
    return (
        OPS_REGISTERED
        and torch.compiler.is_compiling()
        and not _exporting()  # an exported graph must hold only ops every runtime knows
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and _kernels_built()
    )


def pool_mix_train(
    x: Tensor,
    k: Tensor,
    *,
    radius: int,
    eps: float,
    bias: Tensor | None = None,
    multiplier: Tensor | None = None,
) -> Tensor:
    """``kernels.pool_mix_train`` as a custom op: the same values and gradients, traceable."""
    return _native_pool_mix_train_op(x, k, bias, multiplier, radius, eps)[0]


if OPS_REGISTERED:
    kernels.COMPILED_OPS[0] = sys.modules[__name__]

__all__ = ["OPS_REGISTERED", "pool_mix_train", "takes"]

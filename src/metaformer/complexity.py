"""Parameter and MAC counts, with the conventions of fvcore (the counter behind the paper's table).

fvcore counts one MAC per multiply-add of convolutions and matrix products and, for normalisation
layers, 5 operations per element with an affine weight (4 without); pooling and activations are not
counted. torch's own ``FlopCounterMode`` counts the products but skips norms (about 0.5% low), so we
add the norms from forward hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metaformer.models.kernels import native_kernels
from metaformer.models.layers import GroupNorm1Tokens
from metaformer.models.mixers import Attention
from metaformer.models.routes import probes_off


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _norm_ops(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    numel = inputs[0].numel()
    has_weight = getattr(module, "weight", None) is not None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training:
        return numel * (2 if has_weight else 1)
    return numel * (5 if has_weight else 4)


_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm, GroupNorm1Tokens)


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int | Sequence[int] = 224, in_chans: int | None = None) -> int:
    """Multiply-accumulates of one forward pass on a single image of ``img_size`` (fvcore convention)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    chans = in_chans or getattr(model, "in_chans", 3)
    param = next(model.parameters())
    x = torch.zeros(1, chans, h, w, dtype=param.dtype, device=param.device)
    norm_ops = [0]  # norm MACs the op counter misses
    products: dict[str, int] = {}  # attention module name -> its q @ k^T and attn @ v MACs

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        norm_ops[0] += _norm_ops(module, inputs)

    def attention_hook(
        name: str, module: Attention, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        b, n, _ = inputs[0].shape
        products[name] = products.get(name, 0) + 2 * b * module.num_heads * n * n * module.head_dim

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _NORM_TYPES)]
    handles += [
        m.register_forward_hook(partial(attention_hook, name))
        for name, m in model.named_modules()
        if isinstance(m, Attention)
    ]
    was_training = model.training
    model.eval()
    try:
        # count torch's ops, and no route probe's timing runs
        with FlopCounterMode(display=False) as counter, native_kernels(False), probes_off():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() // 2 + norm_ops[0] + _uncounted(products, counter.get_flop_counts())


def _uncounted(products: dict[str, int], counted: dict[str, dict[Any, int]]) -> int:
    """The attention products the op counter did not see: the fused SDPA kernel is invisible to it on
    CPU, while on CUDA (flash) and on the meta device (batched matmuls) it counts them itself."""
    total = 0
    for name, macs in products.items():
        ops = next((ops for module, ops in counted.items() if name and module.endswith(f".{name}")), {})
        if not any("bmm" in str(op) or "attention" in str(op) for op in ops):
            total += macs
    return total

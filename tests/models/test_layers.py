"""Layers whose forward takes a different route by memory layout must not change the result."""

import pytest
import torch

from metaformer.models.layers import Mlp


@pytest.mark.parametrize("act", ["gelu", "starrelu"])
def test_channels_last_mlp_equals_nchw_mlp_with_gradients(act):
    mlp = Mlp(8, 32, act=act)
    x = torch.randn(2, 8, 5, 7)
    x_cl = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x.requires_grad_()
    grad = torch.randn(2, 8, 5, 7)
    assert mlp._gemm_layout(x_cl) and not mlp._gemm_layout(x)  # the two routes really differ
    out, out_cl = mlp(x), mlp(x_cl)
    weights = [p for p in mlp.parameters()]
    g = torch.autograd.grad(out, [x, *weights], grad)
    g_cl = torch.autograd.grad(out_cl, [x_cl, *weights], grad)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_cl, out, atol=1e-6)
    for a, b in zip(g_cl, g, strict=True):
        assert torch.allclose(a, b, atol=1e-5)

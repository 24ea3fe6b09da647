"""Layers whose forward takes a different route by memory layout must not change the result."""

import pytest
import torch

from metaformer.models.layers import Mlp


@pytest.mark.parametrize("act", ["gelu", "starrelu"])
def test_gemm_route_equals_the_convolutions_with_gradients(act, monkeypatch):
    monkeypatch.setattr(Mlp, "_gemm_layout", lambda self, x: not x.is_contiguous())  # in fp32 too
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


def test_mlp_runs_gemms_on_channels_last_maps_under_autocast_only(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    assert not mlp._gemm_layout(x)  # fp32: oneDNN's 1x1 convolutions
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mlp._gemm_layout(x)
        gemm = mlp(x)
        monkeypatch.setattr(Mlp, "_gemm_layout", lambda self, x: False)
        conv = mlp(x)
    assert gemm.shape == conv.shape == x.shape
    torch.testing.assert_close(gemm.float(), conv.float(), rtol=3e-2, atol=3e-2)

"""Layers whose forward takes a different route by layout or measurement must not change the result."""

import pytest
import torch

from metaformer.models import routes
from metaformer.models.kernels import native_available
from metaformer.models.layers import Mlp


# the fused route exists for exact GELU only (StarReLU MLPs never take it: see the test below)
@pytest.mark.parametrize(
    "act, route",
    [("gelu", "conv"), ("gelu", "gemm"), ("gelu", "fused"), ("starrelu", "conv"), ("starrelu", "gemm")],
)
def test_every_mlp_route_equals_the_convolutions_with_gradients(act, route, monkeypatch):
    monkeypatch.setenv("METAFORMER_ROUTE_TRAIN_MLP", route)
    mlp = Mlp(8, 32, act=act)
    if route == "fused" and not native_available():
        pytest.skip("the fused route needs the native kernels (a C compiler)")
    fused_calls = []
    monkeypatch.setattr(
        Mlp, "_forward_fused", lambda self, t, real=Mlp._forward_fused: fused_calls.append(1) or real(self, t)
    )
    x = torch.randn(2, 8, 5, 7)
    x_cl = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x.requires_grad_()
    grad = torch.randn(2, 8, 5, 7)
    assert mlp._rows_layout(x_cl) and not mlp._rows_layout(x)  # only channels-last maps have a choice
    calls = []
    monkeypatch.setattr(
        Mlp, "_forward_rows", lambda self, t, real=Mlp._forward_rows: calls.append(1) or real(self, t)
    )
    out, out_cl = mlp(x), mlp(x_cl)
    assert len(calls) == (route == "gemm")  # the forced route really ran
    assert len(fused_calls) == (route == "fused")
    weights = [p for p in mlp.parameters()]
    g = torch.autograd.grad(out, [x, *weights], grad)
    g_cl = torch.autograd.grad(out_cl, [x_cl, *weights], grad)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_cl, out, atol=1e-6)
    for a, b in zip(g_cl, g, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("route", ["conv", "gemm", "fp32"])
def test_mlp_routes_under_autocast_agree_to_bf16_precision(route, monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = mlp(x)
        monkeypatch.setenv("METAFORMER_ROUTE_TRAIN_MLP", route)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mlp(x.bfloat16())
    assert got.shape == x.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_the_mlp_route_is_measured_once_per_shape_class(monkeypatch, tmp_path):
    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    routes.reset()
    mlp = Mlp(8, 32)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(x).float().sum().backward()
    made = [d for d in routes.decisions() if d.route == "train_mlp"]
    assert len(made) == 1 and set(made[0].times_ms) == {"conv", "gemm", "fp32"}
    assert made[0].choice == min(made[0].times_ms, key=made[0].times_ms.get)  # never the slower one
    assert all(p.grad is not None for p in mlp.parameters())  # the step itself still trained
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mlp(x)  # same class: no new probe
    assert len([d for d in routes.decisions() if d.route == "train_mlp"]) == 1
    mlp(x)  # fp32 is another class: conv, GEMM and (where the native kernels build) the fused GEMM
    fp32 = [
        d for d in routes.decisions() if d.route == "train_mlp" and d.shape_class.startswith("torch.float32")
    ]
    expected = {"conv", "gemm"} | ({"fused"} if native_available() else set())
    assert len(fp32) == 1 and set(fp32[0].times_ms) == expected
    routes.reset()


def test_a_starrelu_mlp_never_offers_the_fused_route():
    """The fused kernel computes exact GELU: any other activation must stay off it, even when forced."""
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert not Mlp(8, 32, act="starrelu")._fused_ok(x)
    assert not Mlp(8, 32, act=lambda: torch.nn.GELU("tanh"))._fused_ok(x)
    assert Mlp(8, 32)._fused_ok(x) == native_available()

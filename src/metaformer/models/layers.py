"""Small building blocks: norms, activations, scales, DropPath and the channel MLP.

Every norm exists in two layouts: channel-first maps (B, C, H, W) and token sequences (B, N, C),
which attention stages use. ``make_norm(name, dim, tokens=...)`` picks the right one, so a config
names a norm once and every stage gets the layout it runs in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metaformer.errors import ConfigError, close_matches_hint
from metaformer.models.kernels import portable
from metaformer.models.routes import bucket, choose, step_probe


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group: normalises over C, H and W jointly (the paper's "MLN")."""

    def __init__(self, num_channels: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(1, num_channels, eps=eps)
        if not bias:
            self.bias = None


class GroupNorm1Tokens(nn.Module):
    """GroupNorm with one group on (B, N, C) tokens: statistics over N and C, affine per channel."""

    def __init__(self, num_channels: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-2:], eps=self.eps) * self.weight
        return x + self.bias if self.bias is not None else x


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, num_channels: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(num_channels, eps=eps, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerNormTokens(nn.LayerNorm):
    def __init__(self, num_channels: int, eps: float = 1e-6, bias: bool = True):
        super().__init__(num_channels, eps=eps, bias=bias)


class BatchNormTokens(nn.BatchNorm1d):
    """BatchNorm over channels of (B, N, C) tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _no_norm(num_channels: int) -> nn.Module:
    return nn.Identity()


# name -> (map layout factory, token layout factory); eps and bias follow the models that use them:
# v1 PoolFormer GroupNorm eps 1e-5 with bias, MetaFormer-baselines norms eps 1e-6 without bias,
# the official attention-hybrid ablations a channel LayerNorm with bias and eps 1e-5.
NORMS: dict[str, tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]] = {
    "groupnorm1": (lambda c: GroupNorm1(c, 1e-5), lambda c: GroupNorm1Tokens(c, 1e-5)),
    "groupnorm1_nobias": (
        lambda c: GroupNorm1(c, 1e-6, bias=False),
        lambda c: GroupNorm1Tokens(c, 1e-6, bias=False),
    ),
    "layernorm": (lambda c: LayerNorm2d(c, 1e-5), lambda c: LayerNormTokens(c, 1e-5)),
    "layernorm_nobias": (
        lambda c: LayerNorm2d(c, 1e-6, bias=False),
        lambda c: LayerNormTokens(c, 1e-6, bias=False),
    ),
    "batchnorm": (nn.BatchNorm2d, BatchNormTokens),
    "none": (_no_norm, _no_norm),
}


def make_norm(norm: str | Callable[[int], nn.Module], dim: int, *, tokens: bool = False) -> nn.Module:
    """Build a norm from its name (see NORMS) or from a user's ``Norm(num_channels)`` class."""
    if callable(norm):
        return norm(dim)
    if norm not in NORMS:
        raise ConfigError(
            f"unknown norm '{norm}'{close_matches_hint(norm, NORMS)} (choose from {', '.join(NORMS)})"
        )
    return NORMS[norm][1 if tokens else 0](dim)


class StarReLU(nn.Module):
    """s * relu(x)**2 + b with learnable scalars s, b (MetaFormer baselines; init 1 and 0 as released)."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), scale_value))
        self.bias = nn.Parameter(torch.full((1,), bias_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.relu(x).square() + self.bias


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "starrelu": StarReLU,
    "squaredrelu": SquaredReLU,
}


def make_activation(act: str | Callable[[], nn.Module]) -> nn.Module:
    if callable(act):
        return act()
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation '{act}'{close_matches_hint(act, ACTIVATIONS)}"
            f" (choose from {', '.join(ACTIVATIONS)})"
        )
    return ACTIVATIONS[act]()


class Scale(nn.Module):
    """Learnable per-channel scale (LayerScale on a branch, ResScale on a shortcut)."""

    def __init__(self, dim: int, init_value: float, *, tokens: bool = False):
        super().__init__()
        self.shape = (dim,) if tokens else (dim, 1, 1)
        self.scale = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(self.shape)


class NoShortcut(nn.Module):
    """In place of a sub-block's shortcut: adds nothing, so the branch's output replaces its input
    (the paper's Table 5 "residual connection -> none")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(())


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, scaling kept ones by 1/keep."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Channel MLP: fc1 -> act -> drop -> fc2 -> drop; 1x1 convs on maps, Linear on tokens."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act: str | Callable[[], nn.Module] = "gelu",
        bias: bool = True,
        drop: float = 0.0,
        *,
        tokens: bool = False,
    ):
        super().__init__()
        if tokens:
            self.fc1: nn.Module = nn.Linear(dim, hidden_dim, bias=bias)
            self.fc2: nn.Module = nn.Linear(hidden_dim, dim, bias=bias)
        else:
            self.fc1 = nn.Conv2d(dim, hidden_dim, 1, bias=bias)
            self.fc2 = nn.Conv2d(hidden_dim, dim, 1, bias=bias)
        self.act = make_activation(act)
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_conv(x)
        return self._forward_routed(x)

    def _forward_routed(self, x: torch.Tensor) -> torch.Tensor:
        """The measured route for channels-last CPU maps in eager mode, else the plain convolutions."""
        if self._rows_layout(x):
            route = self._route(x)
            if route == "gemm":
                return self._forward_rows(x)
            if route == "fused":
                return self._forward_fused(x)
            if route == "fp32":
                return self._forward_fp32(x)
        return self._forward_conv(x)

    def _forward_conv(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A channels-last map is a (B, H, W, C) row matrix: the 1x1 convs as GEMMs on it give the same
        result with the same parameters and no copies."""
        x = F.linear(x.permute(0, 2, 3, 1), self.fc1.weight.flatten(1), self.fc1.bias)
        x = F.linear(self.drop1(self.act(x)), self.fc2.weight.flatten(1), self.fc2.bias)
        return self.drop2(x).permute(0, 3, 1, 2)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM route with fc1's bias and GELU in one native pass that also keeps GELU's derivative
        (``kernels.linear_gelu``): the backward then needs no erf and sums the bias gradient on the way."""
        from metaformer.models.kernels import linear_gelu

        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        hidden = linear_gelu(rows, self.fc1.weight.flatten(1), self.fc1.bias)
        y = F.linear(hidden, self.fc2.weight.flatten(1), self.fc2.bias)
        return self.drop2(y).view(b, h, w, -1).permute(0, 3, 1, 2)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        from metaformer.models.kernels import linear_gelu_supported

        exact_gelu = isinstance(self.act, nn.GELU) and self.act.approximate == "none"
        no_dropout = not (self.training and self.drop1.p > 0)
        return exact_gelu and no_dropout and linear_gelu_supported(x, self.fc1.weight)

    def _forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMMs outside autocast: where bf16 is emulated they beat bf16 ones ~10x."""
        with torch.autocast("cpu", enabled=False):
            return self._forward_rows(x.float()).to(x.dtype)

    def _route(self, x: torch.Tensor) -> str:
        """1x1 convolutions, GEMMs, GEMMs with fc1's bias and GELU fused natively, or (under autocast)
        fp32 GEMMs: measured on this shape. On the 2-core
        AVX512 machine the convolutions won in fp32 and the GEMMs under bf16 autocast; on an AVX2 CPU,
        where bf16 is emulated, fp32 wins under autocast by ~10x."""
        autocast = torch.is_autocast_enabled("cpu")
        b, c, h, w = x.shape
        shape_class = (
            f"{torch.get_autocast_dtype('cpu') if autocast else x.dtype}"
            f"-{'train' if torch.is_grad_enabled() else 'eval'}"
            f"-rows{bucket(b * h * w)}-c{c}-h{self.fc1.weight.shape[0]}"
        )
        weights = [
            p for p in (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias) if p is not None
        ]
        candidates = {
            "conv": step_probe(self._forward_conv, x, weights),
            "gemm": step_probe(self._forward_rows, x, weights),
        }
        if self._fused_ok(x):
            candidates["fused"] = step_probe(self._forward_fused, x, weights)
        if autocast:
            candidates["fp32"] = step_probe(self._forward_fp32, x, weights)
        return choose("train_mlp", shape_class, candidates)

    def _rows_layout(self, x: torch.Tensor) -> bool:
        return (
            not portable()  # first: under FX tracing x is a proxy, and the checks below would branch on it
            and isinstance(self.fc1, nn.Conv2d)
            and isinstance(self.act, _ELEMENTWISE_ACTS)  # a user's act may expect channels in dim 1
            and x.device.type == "cpu"
            and x.ndim == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous()
        )


_ELEMENTWISE_ACTS = (nn.GELU, nn.ReLU, nn.SiLU, StarReLU, SquaredReLU)

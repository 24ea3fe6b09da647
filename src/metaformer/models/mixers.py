"""Token mixers: the part of a MetaFormer block that mixes information across positions.

One interface: ``Mixer(dim, **kwargs)`` maps a tensor to one of the same shape. Two class attributes
tell the stage how to call it:

- ``wants_tokens``: the mixer works on (B, N, C) token sequences rather than (B, C, H, W) maps; the
  stage flattens once for all its blocks.
- ``fixed_grid``: the mixer owns an N x N matrix, so it only works at one token grid. The stage then
  passes ``grid_size=(H, W)`` for that stage, and the mixer rejects any other grid with a clear error.

A user's own mixer joins by following the same interface (or by ``register_mixer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metaformer.errors import ConfigError, InputSizeError, close_matches_hint
from metaformer.models.kernels import portable
from metaformer.models.layers import StarReLU


class Identity(nn.Module):
    """Returns its input: the IdentityFormer ablation (the block keeps norm, MLP and residuals)."""

    wants_tokens = False
    fixed_grid = False

    def __init__(self, dim: int, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Pooling(nn.Module):
    """Mean of the k x k neighbourhood minus the token itself: the block's residual adds the token back.

    Border means divide by the in-image count only (``count_include_pad=False``), as in the paper.
    """

    wants_tokens = False
    fixed_grid = False

    def __init__(self, dim: int, pool_size: int = 3, **kwargs):
        super().__init__()
        if pool_size < 1 or pool_size % 2 == 0:
            raise ConfigError(f"pool_size must be an odd positive integer, got {pool_size}")
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class _GridMixer(nn.Module):
    """Base of mixers holding an N x N token matrix, N = H*W of one fixed grid."""

    wants_tokens = False
    fixed_grid = True

    def __init__(self, grid_size: tuple[int, int]):
        super().__init__()
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_tokens = self.grid_size[0] * self.grid_size[1]

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.grid_size:
            h, w = self.grid_size
            raise InputSizeError(
                f"{type(self).__name__} mixes a fixed {h}x{w} token grid but got "
                f"{x.shape[-2]}x{x.shape[-1]}; feed the input size the model was built for "
                f"(create_model(..., img_size=(H, W)) sets it)"
            )

    def _mix(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not portable():  # a traced graph has no Python checks (and FX inputs are proxies)
                self._check(x)
        b, c, h, w = x.shape
        return (x.reshape(b, c, h * w) @ matrix.t()).reshape(b, c, h, w)


class RandomMixing(_GridMixer):
    """RandFormer: a frozen random token-mixing matrix (U[0,1) then row softmax); X' = W X."""

    def __init__(self, dim: int, grid_size: tuple[int, int] = (14, 14), **kwargs):
        super().__init__(grid_size)
        matrix = torch.softmax(torch.rand(self.num_tokens, self.num_tokens), dim=-1)
        self.random_matrix = nn.Parameter(matrix, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(x, self.random_matrix)


class SpatialMlp(_GridMixer):
    """Token-mixing fully connected layer over the H*W tokens (the paper's SpatialFC hybrid ablation)."""

    def __init__(self, dim: int, grid_size: tuple[int, int] = (7, 7), **kwargs):
        super().__init__(grid_size)
        self.fc = nn.Linear(self.num_tokens, self.num_tokens, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(x, self.fc.weight)


class SepConv(nn.Module):
    """Inverted separable convolution (ConvFormer): pw 1x1 -> StarReLU -> dw 7x7 -> pw 1x1, no biases."""

    wants_tokens = False
    fixed_grid = False

    def __init__(
        self, dim: int, expansion_ratio: float = 2, kernel_size: int = 7, bias: bool = False, **kwargs
    ):
        super().__init__()
        mid = int(expansion_ratio * dim)
        self.pwconv1 = nn.Conv2d(dim, mid, 1, bias=bias)
        self.act1 = StarReLU()
        self.dwconv = nn.Conv2d(mid, mid, kernel_size, padding=kernel_size // 2, groups=mid, bias=bias)
        self.act2 = nn.Identity()
        self.pwconv2 = nn.Conv2d(mid, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pwconv2(self.act2(self.dwconv(self.act1(self.pwconv1(x)))))


class DepthwiseConv(nn.Module):
    """One depthwise k x k convolution with bias, same padding: the paper's "depthwise convolution" ablation.

    Unlike ``SepConv`` there is no pointwise projection or activation: each channel mixes only its
    own k x k neighbourhood, with learned instead of averaged weights. (B, C, H, W) -> same shape.
    """

    wants_tokens = False
    fixed_grid = False

    def __init__(self, dim: int, kernel_size: int = 3, bias: bool = True, **kwargs):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be an odd positive integer, got {kernel_size}")
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """Global multi-head self-attention over the stage's tokens (CAFormer): head_dim 32, fused SDPA."""

    wants_tokens = True
    fixed_grid = False

    def __init__(
        self, dim: int, head_dim: int = 32, qkv_bias: bool = False, proj_bias: bool = False, **kwargs
    ):
        super().__init__()
        self.head_dim = head_dim
        self.num_heads = max(dim // head_dim, 1)
        inner = self.num_heads * head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


MIXERS: dict[str, type[nn.Module]] = {
    "identity": Identity,
    "pooling": Pooling,
    "random": RandomMixing,
    "sepconv": SepConv,
    "dwconv": DepthwiseConv,
    "attention": Attention,
    "spatial_mlp": SpatialMlp,
}


def register_mixer(name: str, mixer: type[nn.Module]) -> type[nn.Module]:
    """Make a user's mixer class available by name (in configs, ``mixers=...`` and the CLI)."""
    if name in MIXERS and MIXERS[name] is not mixer:
        raise ConfigError(f"a token mixer named '{name}' is already registered; pick another name")
    MIXERS[name] = mixer
    return mixer


def resolve_mixer(mixer: str | type[nn.Module]) -> type[nn.Module]:
    if not isinstance(mixer, str):
        return mixer
    if mixer not in MIXERS:
        raise ConfigError(
            f"unknown token mixer '{mixer}'{close_matches_hint(mixer, MIXERS)}"
            f" (choose from {', '.join(MIXERS)}, or register your own with register_mixer)"
        )
    return MIXERS[mixer]

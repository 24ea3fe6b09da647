"""Inference fast path: fold norms and scales into their neighbours, run the channel MLP as
channels-last GEMMs with fused epilogues, and keep every map channels-last.

Folds (exact in real arithmetic; fp32 outputs agree with the plain model to about 1e-6 relative):

- Pooling blocks: with the padding not counted, a per-channel constant pools to itself, so in
  ``pool(GN(x)) - GN(x)`` GroupNorm's mean and bias cancel and ``1/sigma`` factors out:
  ``x + ls1 * (pool(GN(x)) - GN(x)) == lerp(x, pool(x), ls1 * w / sigma)``: the mixer half is one
  statistics pass, one pool and one lerp.
- The affine of the norm before a linear layer folds into that layer (``W diag(w)``, ``c + W b``):
  norm2 into fc1, and norm1 into SepConv's first pointwise conv or attention's qkv.
- LayerScale folds into the layer that ends its branch (fc2, SepConv's pwconv2, attention's proj),
  and so do StarReLU's scalar scale and bias (``fc2(s*r + b) = (s W) r + (c + b W 1)``).
- On CPU, a PoolFormer block's statistics, pooling, mixing and second norm run as one native kernel
  (``models.kernels``, three passes over the map instead of seven; torch ops when no C compiler is
  at hand), fc1 runs with its activation and fc2 with the residual add fused into the GEMM (oneDNN
  post-ops); elsewhere (GPU, tracing, export, torch.compile) the same folded weights run through
  plain ops. Also on CPU, each stage runs a few samples at a time (``ChunkedBlocks``), so the
  intermediates stay in cache instead of being allocated afresh for the whole batch per op.

Parts no fold applies to (spatial MLP, random mixing, positional embeddings, the head) are kept as
they are, so every model still gives the plain model's outputs. The folded model is for inference
only: its weights are buffers and its ``state_dict`` is not a checkpoint format.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metaformer.errors import ConfigError
from metaformer.models.kernels import (
    bias_gelu_,
    linear_gelu_supported,
    pool_mix,
    pool_mix_supported,
    portable,
)
from metaformer.models.kernels.triton_pool import pool_mix_normed_triton, triton_supported
from metaformer.models.layers import (
    BatchNormTokens,
    GroupNorm1Tokens,
    LayerNorm2d,
    Mlp,
    NoShortcut,
    Scale,
    SquaredReLU,
    StarReLU,
)
from metaformer.models.metaformer import MetaFormer, MetaFormerBlock, MetaFormerFeatures
from metaformer.models.mixers import Attention, Identity, Pooling, RandomMixing, SepConv, SpatialMlp
from metaformer.models.routes import bucket, choose

logger = logging.getLogger(__name__)

_MKLDNN_ACTS = {
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
}


def _has_mkldnn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


_MKLDNN = _has_mkldnn_linear()


_portable = portable  # tracing, scripting or compiling: ops every exporter and compiler understands


_ONEDNN_FAILED: set[torch.dtype] = set()  # dtypes whose fused primitive this CPU could not create


def onednn_usable(x: torch.Tensor) -> bool:
    """oneDNN fused GEMMs (a private op): CPU fp32/bf16 in eager mode only (tracing and export need
    portable ops), and not for a dtype whose primitive already failed here."""
    return (
        _MKLDNN
        and not _portable()  # before any look at x: under FX tracing it is a proxy
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dtype not in _ONEDNN_FAILED
    )


class FusedLinear(nn.Module):
    """``act(x @ W.T + b) [+ residual]`` over the last dimension; one oneDNN call on CPU where it runs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none"):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().contiguous())
        self.act = act  # none | gelu | gelu_tanh | relu | silu | squaredrelu (relu, then square)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        onednn: bool = True,
        native: bool = False,
    ) -> torch.Tensor:
        """``onednn=False`` takes the public ops (what a route chose); a oneDNN primitive this CPU
        cannot create (bf16 inner products without AVX512-BF16, for one) falls back to them too.
        ``native``: for an exact-GELU layer, the GEMM without bias, then the bias and GELU in one native
        pass in place (``kernels.bias_gelu_``)."""
        if native and self.native_ok(x) and residual is None:
            return bias_gelu_(torch.mm(x, self.weight.t()), self.bias)
        if onednn and onednn_usable(x) and x.is_contiguous():
            try:
                return self._onednn(x, residual)
            except RuntimeError as error:
                _ONEDNN_FAILED.add(x.dtype)
                logger.debug("oneDNN fused linear failed for %s (%s); using torch ops", x.dtype, error)
        y = self._activate(F.linear(x, self.weight, self.bias))
        return y if residual is None else y + residual

    def native_ok(self, x: torch.Tensor) -> bool:
        """Exact GELU on fp32 CPU rows, with no autograd through it (the pass works in place)."""
        no_autograd = not (torch.is_grad_enabled() and x.requires_grad)
        return self.act == "gelu" and x.dim() == 2 and no_autograd and linear_gelu_supported(x, self.weight)

    def _onednn(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is not None and self.act == "none" and residual.is_contiguous():
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        act = "relu" if self.act == "squaredrelu" else self.act
        attr, algorithm = _MKLDNN_ACTS.get(act, ("none", ""))
        y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm)
        if self.act == "squaredrelu":
            y = y.square_()
        return y if residual is None else y + residual

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer as a 1x1 convolution of a (B, C, H, W) map, in plain ops."""
        return self._activate(F.conv2d(x, self.weight[:, :, None, None], self.bias))

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.act in ("gelu", "gelu_tanh"):
            return F.gelu(y, approximate="none" if self.act == "gelu" else "tanh")
        if self.act == "relu":
            return F.relu(y)
        if self.act == "silu":
            return F.silu(y)
        if self.act == "squaredrelu":
            return F.relu(y).square()
        return y

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, act={self.act}"


# --------------------------------------------------------------------------- fold helpers
def _as_matrix(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight (out, in) and bias of a Linear or a 1x1 Conv2d, in float64 for exact folding."""
    weight = layer.weight.detach().double()
    if weight.ndim == 4:
        weight = weight.flatten(1)
    bias = None if layer.bias is None else layer.bias.detach().double()
    return weight, bias


def _fold_input_affine(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W (s * x + t) + c == (W diag(s)) x + (c + W t)."""
    if shift is not None:
        bias = (bias if bias is not None else weight.new_zeros(weight.shape[0])) + weight @ shift
    if scale is not None:
        weight = weight * scale[None, :]
    return weight, bias


def _fold_output_scale(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """s * (W x + c) == (diag(s) W) x + s c."""
    if scale is None:
        return weight, bias
    return weight * scale[:, None], None if bias is None else bias * scale


def _scale_of(module: nn.Module) -> torch.Tensor | None:
    return module.scale.detach().double() if isinstance(module, Scale) else None


def _norm_parts(norm: nn.Module, tokens: bool) -> tuple[str, float, torch.Tensor | None, torch.Tensor | None]:
    """Split a norm into an affine-free kind ("sample", "channel" or "none"), eps, weight and bias."""

    def param(p: torch.Tensor | None) -> torch.Tensor | None:
        return None if p is None else p.detach().double()

    if isinstance(norm, nn.Identity):
        return "none", 0.0, None, None
    if not tokens and isinstance(norm, nn.GroupNorm) and norm.num_groups == 1:
        return "sample", norm.eps, param(norm.weight), param(norm.bias)
    if tokens and isinstance(norm, GroupNorm1Tokens):
        return "sample", norm.eps, param(norm.weight), param(norm.bias)
    if (
        isinstance(norm, nn.LayerNorm)
        and len(norm.normalized_shape) == 1
        and (tokens or isinstance(norm, LayerNorm2d))
    ):
        return "channel", norm.eps, param(norm.weight), param(norm.bias)
    if isinstance(norm, (nn.BatchNorm2d, BatchNormTokens)) and norm.track_running_stats:
        inv = torch.rsqrt(norm.running_var.double() + norm.eps)
        weight = inv if norm.weight is None else norm.weight.detach().double() * inv
        bias = -norm.running_mean.double() * weight
        if norm.bias is not None:
            bias = bias + norm.bias.detach().double()
        return "none", 0.0, weight, bias
    raise NotImplementedError  # caller keeps the block as it is


def _act_name(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, (StarReLU, SquaredReLU)):
        return "squaredrelu"
    return None


def _sample_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(var + eps) over all but the batch dimension, shaped (B, 1, 1, 1).

    ``native_layer_norm`` on the (B, H*W*C) view of a channels-last map is about 6x faster than
    ``torch.var`` on CPU (it also writes the normalised map, which is cheaper than var's reduction).
    The result has ``x``'s dtype: CUDA's kernel returns fp32 statistics for bf16/fp16 inputs.
    """
    if _portable():
        centred = x - x.mean((1, 2, 3), keepdim=True)
        return 1.0 / torch.sqrt((centred * centred).mean((1, 2, 3), keepdim=True) + eps)
    rows = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return torch.native_layer_norm(rows, rows.shape[1:], None, None, eps)[2].view(-1, 1, 1, 1).to(x.dtype)


def _normalize(x: torch.Tensor, kind: str, eps: float, dim: int) -> torch.Tensor:
    """Affine-free norm of (B, L, C) rows: per sample ('sample'), per position ('channel') or none."""
    if kind == "none":
        return x
    if kind == "sample" and _portable():  # explicit ops: an exported graph has no shape-dependent norm
        mean = x.mean((1, 2), keepdim=True)
        centred = x - mean
        return centred / torch.sqrt((centred * centred).mean((1, 2), keepdim=True) + eps)
    if kind == "sample":
        return F.layer_norm(x, x.shape[1:], eps=eps)
    return F.layer_norm(x, (dim,), eps=eps)  # dim, not x.shape[-1]: a traced graph needs a constant


# --------------------------------------------------------------------------- folded parts
class FoldedMlp(nn.Module):
    """x -> x * rs2 + ls2 * mlp(norm2(x)) with the norm's affine in fc1 and ls2 (and StarReLU) in fc2."""

    def __init__(self, block: MetaFormerBlock, tokens: bool):
        super().__init__()
        mlp = block.mlp
        kind, eps, w, b = _norm_parts(block.norm2, tokens)
        act = _act_name(mlp.act)
        if act is None or not isinstance(mlp, Mlp):
            raise NotImplementedError
        self.norm_kind, self.eps = kind, eps
        self.dim = block.mlp.fc1.weight.shape[1]
        w1, c1 = _fold_input_affine(*_as_matrix(mlp.fc1), w, b)
        w2, c2 = _as_matrix(mlp.fc2)
        if isinstance(mlp.act, StarReLU):  # fc2(s * relu(x)^2 + b)
            w2, c2 = _fold_input_affine(
                w2, c2, mlp.act.scale.detach().double().expand(w2.shape[1]),
                mlp.act.bias.detach().double().expand(w2.shape[1]),
            )  # fmt: skip
        w2, c2 = _fold_output_scale(w2, c2, _scale_of(block.layer_scale2))
        dtype = mlp.fc1.weight.dtype
        self.fc1 = FusedLinear(w1.to(dtype), None if c1 is None else c1.to(dtype), act)
        self.fc2 = FusedLinear(w2.to(dtype), None if c2 is None else c2.to(dtype))
        rs = _scale_of(block.res_scale2)
        self.register_buffer("res_scale", None if rs is None else rs.to(dtype))

    def forward(
        self,
        x: torch.Tensor,
        normalized: torch.Tensor | None = None,
        *,
        onednn: bool | None = None,
        native: bool = False,
    ) -> torch.Tensor:
        """(B, L, C) tokens or channels-last rows -> same shape; ``normalized`` is ``norm2(x)`` (without
        its affine) when the caller already computed it. ``onednn=None``: measured (``fast_mlp``);
        ``native``: fc1's bias and GELU in one native pass."""
        c = x.shape[-1]
        rows = x.reshape(-1, c)
        if onednn is None:
            choice = self.route(x, tokens=True)
            onednn, native = choice == "onednn", choice == "native"
        if normalized is None:
            normalized = _normalize(x, self.norm_kind, self.eps, self.dim)
        h = self.fc1(normalized.reshape(-1, c), onednn=onednn, native=native)
        if self.res_scale is None:
            return self.fc2(h, residual=rows, onednn=onednn).view(x.shape)
        return self.fc2(h, onednn=onednn).addcmul_(rows, self.res_scale).view(x.shape)

    def route(
        self, x: torch.Tensor, *, tokens: bool, candidates: dict[str, Callable[[], object]] | None = None
    ) -> str:
        """Plain GEMMs, oneDNN's fused GEMMs or (maps only) 1x1 convolutions, measured on this shape."""
        if _portable() or x.device.type != "cpu":
            return "gemm"
        if candidates is None:
            candidates = {"gemm": lambda: self(x, onednn=False)}
            if onednn_usable(x):
                candidates["onednn"] = lambda: self(x, onednn=True)
            if self.fc1.native_ok(x.reshape(-1, x.shape[-1])):
                candidates["native"] = lambda: self(x, onednn=False, native=True)
        rows = x.numel() // x.shape[-1 if tokens else 1]
        shape_class = (
            f"{x.dtype}-{'tokens' if tokens else 'map'}-rows{bucket(rows)}-c{self.dim}"
            f"-h{self.fc1.weight.shape[0]}-{self.norm_kind}"
        )
        return choose("fast_mlp", shape_class, candidates)

    def forward_map(self, x: torch.Tensor, normalized: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> same, with the folded weights as 1x1 convolutions (portable graphs)."""
        if normalized is not None:
            xn = normalized
        elif self.norm_kind == "sample":
            centred = x - x.mean((1, 2, 3), keepdim=True)
            xn = centred / torch.sqrt((centred * centred).mean((1, 2, 3), keepdim=True) + self.eps)
        elif self.norm_kind == "channel":
            xn = F.layer_norm(x.permute(0, 2, 3, 1), (self.dim,), eps=self.eps).permute(0, 3, 1, 2)
        else:
            xn = x
        h = self.fc1.forward_map(xn)
        y = self.fc2.forward_map(h)
        return x + y if self.res_scale is None else x * self.res_scale.view(1, -1, 1, 1) + y


class FoldedPoolBlock(nn.Module):
    """A PoolFormer block (GroupNorm-1, pooling) with its norm folded away: see the module docstring."""

    def __init__(self, block: MetaFormerBlock):
        super().__init__()
        pool = block.token_mixer.pool
        kind, eps, w, _ = _norm_parts(block.norm1, tokens=False)
        if kind != "sample" or pool.count_include_pad or pool.ceil_mode:
            raise NotImplementedError
        dim = block.mlp.fc1.weight.shape[1]
        dtype = block.mlp.fc1.weight.dtype
        scale = torch.ones(dim, dtype=torch.float64, device=block.mlp.fc1.weight.device) if w is None else w
        ls = _scale_of(block.layer_scale1)
        if ls is not None:
            scale = scale * ls
        self.register_buffer("mix_scale", scale.to(dtype).view(1, dim, 1, 1))
        rs = _scale_of(block.res_scale1)
        self.register_buffer("res_scale", None if rs is None else rs.to(dtype).view(1, dim, 1, 1))
        self.eps = eps
        self.kernel_size, self.padding = pool.kernel_size, pool.padding
        self.mlp = FoldedMlp(block, tokens=False)
        # the native kernel takes square odd windows centred on each position (PoolFormer's 3x3, pad 1)
        size = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        square = pool.kernel_size in (size, (size, size)) and pool.padding in (size // 2, (size // 2,) * 2)
        self.native_radius = size // 2 if square and size % 2 == 1 and pool.stride in (1, (1, 1)) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._triton_ok(x):
            return self._forward_triton(x)
        if (
            self.native_radius is not None
            and self.res_scale is None
            and self.mlp.norm_kind in ("sample", "none")
            and pool_mix_supported(x)
        ):
            b, c, h, w = x.shape
            shape_class = f"{x.dtype}-b{bucket(b)}-c{c}-hw{bucket(h * w)}-r{self.native_radius}"
            candidates = {"torch": lambda: self._forward_torch(x), "native": lambda: self._forward_native(x)}
            if choose("fast_pool_mix", shape_class, candidates) == "native":
                return self._forward_native(x)
        return self._forward_torch(x)

    def _triton_ok(self, x: torch.Tensor) -> bool:
        """The opt-in Triton kernels (``kernels.triton_pool``) take what the native kernel takes."""
        return (
            self.native_radius is not None
            and self.res_scale is None
            and self.mlp.norm_kind in ("sample", "none")
            and triton_supported(x)
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        # compiled or exported, _map_mlp normalises inside its own graph: only y is needed then
        norm_eps = self.mlp.eps if self.mlp.norm_kind == "sample" and not _portable() else None
        y, normed = pool_mix_normed_triton(x, self.mix_scale, self.native_radius, self.eps, norm_eps)
        return _map_mlp(self.mlp, y, normed)

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        norm_eps = self.mlp.eps if self.mlp.norm_kind == "sample" else None
        y, normed = pool_mix(x, self.mix_scale, self.native_radius, self.eps, norm_eps)
        return _map_mlp(self.mlp, y, normed)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        if _portable() and self.res_scale is None:
            # exported: x + s * (pool(n) - n) with n the normalised map (equal: pooling without the padding
            # keeps n's mean), written as mean/variance ops that runtimes fuse into one norm (OpenVINO's
            # MVN), where 1/sigma alone would be two reductions and a chain of element-wise ops
            centred = x - x.mean((1, 2, 3), keepdim=True)
            normed = centred / torch.sqrt((centred * centred).mean((1, 2, 3), keepdim=True) + self.eps)
            pooled = F.avg_pool2d(normed, self.kernel_size, 1, self.padding, count_include_pad=False)
            return _map_mlp(self.mlp, x + self.mix_scale * (pooled - normed))
        scale = self.mix_scale * _sample_rstd(x, self.eps)
        pooled = F.avg_pool2d(x, self.kernel_size, 1, self.padding, count_include_pad=False)
        if self.res_scale is None:
            # lerp is one kernel in eager mode; exporters write it as a Where over two branches
            x = x + scale * (pooled - x) if _portable() else torch.lerp(x, pooled, scale)
        else:  # rs * x + s * (p - x)
            x = pooled.mul_(scale).addcmul_(x, self.res_scale - scale)
        return _map_mlp(self.mlp, x)


def _map_mlp(mlp: FoldedMlp, x: torch.Tensor, normalized: torch.Tensor | None = None) -> torch.Tensor:
    """Run a FoldedMlp on a (B, C, H, W) map as (B, H*W, C) rows (free for channels-last maps), or as
    1x1 convolutions where those measured faster (``fast_mlp``).

    Traced for export (or compiled), it stays a map with 1x1 convolutions: runtimes such as
    onnxruntime lay convolutions out and fuse them themselves, and row GEMMs would add transposes.
    """
    if _portable():
        return mlp.forward_map(x)
    b, c, h, w = x.shape

    def as_rows(onednn: bool, native: bool = False) -> torch.Tensor:
        rows = None if normalized is None else normalized.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = mlp(x.permute(0, 2, 3, 1).reshape(b, h * w, c), rows, onednn=onednn, native=native)
        return out.view(b, h, w, c).permute(0, 3, 1, 2)

    candidates: dict[str, Callable[[], object]] = {"gemm": lambda: as_rows(False)}
    if onednn_usable(x):
        candidates["onednn"] = lambda: as_rows(True)
    if x.device.type == "cpu":
        candidates["conv"] = lambda: mlp.forward_map(x, normalized)
    if x.is_contiguous(memory_format=torch.channels_last) and mlp.fc1.native_ok(x.new_empty(1, c)):
        candidates["native"] = lambda: as_rows(False, native=True)
    choice = mlp.route(x, tokens=False, candidates=candidates)
    if choice == "conv":
        return mlp.forward_map(x, normalized)
    return as_rows(choice == "onednn", native=choice == "native")


class FoldedSepConv(nn.Module):
    """ConvFormer's mixer half: norm1 affine and StarReLU's scale in pwconv1 (s * relu(z)^2 ==
    relu(sqrt(s) z)^2 for s >= 0), layer scale in pwconv2, residual add fused into pwconv2's GEMM."""

    def __init__(self, block: MetaFormerBlock):
        super().__init__()
        mixer = block.token_mixer
        kind, eps, w, b = _norm_parts(block.norm1, tokens=False)
        act = mixer.act1
        if kind == "sample" or not isinstance(act, StarReLU) or not isinstance(mixer.act2, nn.Identity):
            raise NotImplementedError
        dtype = mixer.pwconv1.weight.dtype
        self.norm_kind, self.eps = kind, eps
        self.dim = block.mlp.fc1.weight.shape[1]
        w1, c1 = _fold_input_affine(*_as_matrix(mixer.pwconv1), w, b)
        self.act_scale, self.act_bias = float(act.scale), float(act.bias)
        if self.act_scale >= 0:  # s * relu(z)^2 == relu(sqrt(s) * z)^2
            root = torch.full((w1.shape[0],), self.act_scale, dtype=torch.float64, device=w1.device).sqrt()
            w1, c1 = _fold_output_scale(w1, c1, root)
            self.act_scale = 1.0
        self.pw1 = FusedLinear(w1.to(dtype), None if c1 is None else c1.to(dtype), "squaredrelu")
        self.dwconv = copy.deepcopy(mixer.dwconv)
        w2, c2 = _fold_output_scale(*_as_matrix(mixer.pwconv2), _scale_of(block.layer_scale1))
        self.pw2 = FusedLinear(w2.to(dtype), None if c2 is None else c2.to(dtype))
        rs = _scale_of(block.res_scale1)
        self.register_buffer("res_scale", None if rs is None else rs.to(dtype))
        self.mlp = FoldedMlp(block, tokens=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
        y = self.pw1(_normalize(rows, self.norm_kind, self.eps, self.dim))
        if self.act_scale != 1.0:
            y = y.mul_(self.act_scale)
        if self.act_bias != 0.0:
            y = y.add_(self.act_bias)
        mid = y.shape[-1]
        y = self.dwconv(y.view(b, h, w, mid).permute(0, 3, 1, 2))
        y = y.permute(0, 2, 3, 1).reshape(b * h * w, mid)
        y = (
            self.pw2(y, residual=rows)
            if self.res_scale is None
            else self.pw2(y).addcmul_(rows, self.res_scale)
        )
        x = y.view(b, h, w, c).permute(0, 3, 1, 2)
        return _map_mlp(self.mlp, x)


class FoldedAttention(nn.Module):
    """CAFormer's attention half on (B, N, C) tokens: norm1 affine in qkv, layer scale in proj."""

    def __init__(self, block: MetaFormerBlock):
        super().__init__()
        mixer = block.token_mixer
        kind, eps, w, b = _norm_parts(block.norm1, tokens=True)
        dtype = mixer.qkv.weight.dtype
        self.norm_kind, self.eps = kind, eps
        self.dim = block.mlp.fc1.weight.shape[1]
        self.num_heads, self.head_dim = mixer.num_heads, mixer.head_dim
        wq, cq = _fold_input_affine(*_as_matrix(mixer.qkv), w, b)
        self.qkv = FusedLinear(wq.to(dtype), None if cq is None else cq.to(dtype))
        rs = _scale_of(block.res_scale1)
        wp, cp = _fold_output_scale(*_as_matrix(mixer.proj), _scale_of(block.layer_scale1))
        self.proj = FusedLinear(wp.to(dtype), None if cp is None else cp.to(dtype))
        self.register_buffer("res_scale", None if rs is None else rs.to(dtype))
        self.mlp = FoldedMlp(block, tokens=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(_normalize(x, self.norm_kind, self.eps, self.dim))
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        if self.res_scale is None:
            x = self.proj(y, residual=x)
        else:
            x = self.proj(y).addcmul_(x, self.res_scale)
        return self.mlp(x)


class FoldedGenericBlock(nn.Module):
    """Any other mixer (identity, random, spatial MLP, a user's): mixer half kept, MLP half folded."""

    def __init__(self, block: MetaFormerBlock, tokens: bool):
        super().__init__()
        self.tokens = tokens
        self.norm1 = block.norm1
        self.token_mixer = block.token_mixer
        self.layer_scale1 = block.layer_scale1
        self.res_scale1 = block.res_scale1
        self.mlp = FoldedMlp(block, tokens=tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_scale1(x) + self.layer_scale1(self.token_mixer(self.norm1(x)))
        return self.mlp(x) if self.tokens else _map_mlp(self.mlp, x)


def fold_block(block: MetaFormerBlock, tokens: bool) -> nn.Module:
    """The folded equivalent of one block in eval mode, or the block itself when nothing applies."""
    if not block.channel_mlp or isinstance(block.res_scale1, NoShortcut):
        return block  # a Table 5 ablation block: nothing to fold
    special = {Pooling: FoldedPoolBlock, SepConv: FoldedSepConv, Attention: FoldedAttention}
    builder = special.get(type(block.token_mixer))
    if builder is not None and tokens == (builder is FoldedAttention):
        try:
            return builder(block)
        except NotImplementedError:
            pass
    try:
        return FoldedGenericBlock(block, tokens)
    except NotImplementedError:
        return block


# Positions (rows of the channel GEMMs) per chunk: one 56x56 sample of the first stage. On one thread,
# running stages chunk by chunk was 12-13% faster than whole batches (1024-12544 rows all within 3%);
# with more threads every small op pays an OpenMP fork/join and it lost (S12 0.8x timm instead of ~2x
# on a shared 2-core machine), so the ``fast_chunk`` route measures which one this machine wants.
CHUNK_ROWS = 3136
_PER_SAMPLE_MIXERS = (Identity, Pooling, RandomMixing, SepConv, SpatialMlp, Attention)


class ChunkedBlocks(nn.Module):
    """Runs a stage's blocks a few samples at a time, so each intermediate stays in cache and no
    large buffer is allocated (and page-faulted in) per op. Exact: every folded block is per sample.
    CPU only, where it measures faster (see CHUNK_ROWS); GPUs want big kernels."""

    def __init__(self, blocks: nn.Sequential, tokens: bool, rows: int | None = None):
        super().__init__()
        self.blocks = blocks
        self.tokens = tokens
        self.rows = CHUNK_ROWS if rows is None else rows

    def __iter__(self):
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> nn.Module:
        return self.blocks[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _portable():  # first: under FX tracing x is a proxy, which the checks below would branch on
            return self.blocks(x)
        positions = x.shape[1] if self.tokens else x.shape[2] * x.shape[3]
        step = max(1, self.rows // positions)
        if step >= x.shape[0] or x.device.type != "cpu":
            return self.blocks(x)
        shape_class = f"{x.dtype}-b{bucket(x.shape[0])}-pos{positions}-c{x.shape[-1 if self.tokens else 1]}"
        candidates = {"whole": lambda: self.blocks(x), "chunked": lambda: self._chunked(x, step)}
        if choose("fast_chunk", shape_class, candidates) == "chunked":
            return self._chunked(x, step)
        return self.blocks(x)

    def _chunked(self, x: torch.Tensor, step: int) -> torch.Tensor:
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], step):
            out[start : start + step] = self.blocks(x[start : start + step])
        return out


def _per_sample(block: nn.Module) -> bool:
    if isinstance(block, (FoldedPoolBlock, FoldedSepConv, FoldedAttention)):
        return True
    return isinstance(block, FoldedGenericBlock) and type(block.token_mixer) in _PER_SAMPLE_MIXERS


class ChannelsLastInput(nn.Module):
    """Stem wrapper: hands the stem a channels-last input, so every later map is channels-last."""

    def __init__(self, stem: nn.Module):
        super().__init__()
        self.stem = stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x.contiguous(memory_format=torch.channels_last))


def optimize_for_inference(model: nn.Module, *, compile: bool = False) -> nn.Module:
    """A faster copy of ``model`` for inference with the same outputs (fp32 max relative diff ~1e-6).

    Works for ``MetaFormer`` (forward gives logits) and ``MetaFormerFeatures`` (forward gives stage
    maps). The input model is not changed. ``compile=True`` also compiles the result with Inductor and
    freezing (``metaformer.compiling.compile_module``, whose caches live under the metaformer home; slow
    to start when cold; fuses the remaining element-wise work); call it under ``torch.inference_mode``.
    """
    if not isinstance(model, (MetaFormer, MetaFormerFeatures)):
        raise ConfigError(
            f"optimize_for_inference takes a MetaFormer or MetaFormerFeatures, got {type(model).__name__}; "
            "build the model with metaformer.create_model"
        )
    fast = copy.deepcopy(model).eval()
    fast.requires_grad_(False)
    for stage in fast.stages:
        blocks = nn.Sequential(*[fold_block(block, stage.tokens) for block in stage.blocks])
        if len(blocks) and all(_per_sample(block) for block in blocks):
            blocks = ChunkedBlocks(blocks, stage.tokens)
        stage.blocks = blocks
    fast.stem = ChannelsLastInput(fast.stem)
    fast = fast.to(memory_format=torch.channels_last)
    if compile:
        from metaformer.compiling import compile_module  # not a models/ concern: imported on request

        name = getattr(model, "model_name", type(model).__name__)
        return compile_module(fast, key=f"optimize_for_inference-{name}", freezing=True)
    return fast


__all__ = ["optimize_for_inference", "fold_block", "FusedLinear"]

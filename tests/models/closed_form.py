"""A MetaFormer forward written from the papers' formulas with torch.nn.functional only.

It reads the parameters out of a built model's state dict and the architecture from the names in its
config (``model.model_config``: norm, mixer and activation names), never from the model's modules, so
a module that computes something else than its name promises (a wrong eps, a dropped bias, a mixer
without its ``- x``, a position embedding left out) gives a different result. The norms are
``F.group_norm`` / ``F.layer_norm`` / ``F.batch_norm``, the grid mixers an einsum over the tokens,
attention ``softmax(q k^T / sqrt(d)) v`` written out, the position embedding added by hand.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

# name -> (eps, has bias): the official models' values (PAPER.md: v1 GroupNorm eps 1e-5 with bias,
# the baselines' norms eps 1e-6 without bias, the attention hybrids' LayerNorm eps 1e-5 with bias)
NORM_SPEC = {
    "groupnorm1": (1e-5, True),
    "groupnorm1_nobias": (1e-6, False),
    "layernorm": (1e-5, True),
    "layernorm_nobias": (1e-6, False),
    "batchnorm": (1e-5, True),
}


def norm(name: str | None, x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, tokens: bool):
    """``x`` is (B, C, H, W), or (B, N, C) when ``tokens``."""
    if name in (None, "none"):
        return x
    eps, has_bias = NORM_SPEC[name]
    weight, bias = sd[prefix + "weight"], sd[prefix + "bias"] if has_bias else None
    channels_first = x.transpose(1, 2) if tokens else x  # (B, C, ...)
    if name.startswith("groupnorm1"):  # one group: statistics over C and every position
        out = F.group_norm(channels_first, 1, weight, bias, eps)
    elif name == "batchnorm":
        mean, var = sd[prefix + "running_mean"], sd[prefix + "running_var"]
        out = F.batch_norm(channels_first, mean, var, weight, bias, training=False, eps=eps)
    else:  # LayerNorm over the channels of each position
        last = channels_first.movedim(1, -1)
        out = F.layer_norm(last, (last.shape[-1],), weight, bias, eps).movedim(-1, 1)
    return out.transpose(1, 2) if tokens else out


def activation(name: str, x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "relu":
        return x.clamp_min(0)
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "squaredrelu":
        return x.clamp_min(0) ** 2
    if name == "starrelu":  # s * relu(x)^2 + b with learnable scalars
        return sd[prefix + "scale"] * x.clamp_min(0) ** 2 + sd[prefix + "bias"]
    raise KeyError(name)


def attention(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, head_dim: int = 32) -> torch.Tensor:
    """(B, N, C) tokens; heads of ``head_dim`` channels; no qkv bias, a projection bias where present."""
    b, n, c = x.shape
    heads = max(c // head_dim, 1)
    qkv = F.linear(x, sd[prefix + "qkv.weight"], sd.get(prefix + "qkv.bias"))
    q, k, v = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, heads * head_dim)
    return F.linear(out, sd[prefix + "proj.weight"], sd.get(prefix + "proj.bias"))


def mixer(name: str, x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, kwargs: dict[str, Any]):
    if name == "identity":
        return x
    if name == "pooling":  # mean of the in-image k x k neighbourhood, minus the token itself
        k = kwargs.get("pool_size", 3)
        return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False) - x
    if name in ("random", "spatial_mlp"):  # X'[m] = sum_n W[m, n] X[n] over the H*W tokens
        matrix = sd[prefix + ("random_matrix" if name == "random" else "fc.weight")]
        b, c, h, w = x.shape
        return torch.einsum("mn,bcn->bcm", matrix, x.reshape(b, c, h * w)).reshape(b, c, h, w)
    if name == "dwconv":
        return F.conv2d(
            x, sd[prefix + "conv.weight"], sd.get(prefix + "conv.bias"), padding=1, groups=x.shape[1]
        )
    if name == "sepconv":  # pw 1x1 -> StarReLU -> dw 7x7 -> pw 1x1
        x = F.conv2d(x, sd[prefix + "pwconv1.weight"])
        x = activation("starrelu", x, sd, prefix + "act1.")
        x = F.conv2d(x, sd[prefix + "dwconv.weight"], padding=3, groups=x.shape[1])
        return F.conv2d(x, sd[prefix + "pwconv2.weight"])
    if name == "attention":
        return attention(x, sd, prefix)
    raise KeyError(name)


def _per_stage(value: Any, stages: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * stages


def _scale(x: torch.Tensor, sd: dict[str, torch.Tensor], key: str, tokens: bool) -> torch.Tensor:
    if key not in sd:
        return x
    return x * (sd[key] if tokens else sd[key].view(-1, 1, 1))


def _mlp(x, sd, prefix, act, tokens):
    if tokens:
        hidden = activation(
            act, F.linear(x, sd[prefix + "fc1.weight"], sd.get(prefix + "fc1.bias")), sd, prefix + "act."
        )
        return F.linear(hidden, sd[prefix + "fc2.weight"], sd.get(prefix + "fc2.bias"))
    hidden = F.conv2d(x, sd[prefix + "fc1.weight"], sd.get(prefix + "fc1.bias"))
    hidden = activation(act, hidden, sd, prefix + "act.")
    return F.conv2d(hidden, sd[prefix + "fc2.weight"], sd.get(prefix + "fc2.bias"))


def features(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's output map."""
    cfg = model.model_config
    sd = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    stages = len(cfg["depths"])
    mixers, norms = _per_stage(cfg["mixers"], stages), _per_stage(cfg["norms"], stages)
    mixer_kwargs = _per_stage(cfg.get("mixer_kwargs") or {}, stages)
    pos_embed = _per_stage(cfg.get("pos_embed", False), stages)
    x = F.conv2d(x, sd["stem.conv.weight"], sd["stem.conv.bias"], stride=4, padding=2)
    x = norm(cfg.get("stem_norm"), x, sd, "stem.norm.", tokens=False)
    maps = []
    for i in range(stages):
        if i > 0:
            x = norm(cfg.get("downsample_norm"), x, sd, f"stages.{i}.downsample.norm.", tokens=False)
            x = F.conv2d(x, sd[f"stages.{i}.downsample.conv.weight"], sd[f"stages.{i}.downsample.conv.bias"],
                         stride=2, padding=1)  # fmt: skip
        if pos_embed[i]:
            x = x + sd[f"stages.{i}.pos_embed"]
        b, c, h, w = x.shape
        tokens = mixers[i] == "attention"
        if tokens:
            x = x.flatten(2).transpose(1, 2)
        for j in range(cfg["depths"][i]):
            p = f"stages.{i}.blocks.{j}."
            mixed = mixer(mixers[i], norm(norms[i], x, sd, p + "norm1.", tokens), sd, p + "token_mixer.",
                          mixer_kwargs[i])  # fmt: skip
            x = _scale(x, sd, p + "res_scale1.scale", tokens) + _scale(
                mixed, sd, p + "layer_scale1.scale", tokens
            )
            mlp = _mlp(norm(norms[i], x, sd, p + "norm2.", tokens), sd, p + "mlp.", cfg["act"], tokens)
            x = _scale(x, sd, p + "res_scale2.scale", tokens) + _scale(
                mlp, sd, p + "layer_scale2.scale", tokens
            )
        if tokens:
            x = x.transpose(1, 2).reshape(b, c, h, w)
        maps.append(x)
    return maps


def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits: the official head (GroupNorm over the map, eps 1e-5, then the mean) or timm's (mean, then
    LayerNorm eps 1e-6), then a linear or the baselines' MLP head (fc1, squared ReLU, LayerNorm, fc2)."""
    cfg = model.model_config
    sd = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    x = features(model, x)[-1]
    if cfg.get("final_norm", "map") == "map":
        pooled = F.group_norm(x, 1, sd["head.norm.weight"], sd["head.norm.bias"], 1e-5).mean((-2, -1))
    else:
        pooled = F.layer_norm(
            x.mean((-2, -1)), (x.shape[1],), sd["head.norm.weight"], sd["head.norm.bias"], 1e-6
        )
    if cfg.get("head", "linear") == "linear":
        return F.linear(pooled, sd["head.fc.weight"], sd["head.fc.bias"])
    hidden = F.linear(pooled, sd["head.fc.fc1.weight"], sd["head.fc.fc1.bias"]).clamp_min(0) ** 2
    hidden = F.layer_norm(
        hidden, (hidden.shape[-1],), sd["head.fc.norm.weight"], sd["head.fc.norm.bias"], 1e-6
    )
    return F.linear(hidden, sd["head.fc.fc2.weight"], sd["head.fc.fc2.bias"])


def randomize(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Every trainable parameter random, layer and res scales and norm weights around 1 (at their 1e-5
    init a broken mixer would hide under a 1e-5 tolerance), BatchNorm statistics random too."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            centre = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "scale")) else 0.0
            p.copy_(centre + scale * torch.randn(p.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.3, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()

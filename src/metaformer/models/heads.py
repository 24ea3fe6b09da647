"""The classifier heads: final norm, global pooling (or none) and the classifier."""

from __future__ import annotations

import torch
from torch import nn

from metaformer.errors import ConfigError
from metaformer.models.layers import make_activation

FINAL_NORMS = ("map", "pooled")
HEADS = ("linear", "mlp")
GLOBAL_POOLS = ("avg", "")  # timm's names: average pooling, or none (the head then keeps the map)


class MlpHead(nn.Module):
    """ConvFormer/CAFormer classifier: fc1 -> SquaredReLU -> LayerNorm -> dropout -> fc2."""

    def __init__(self, dim: int, num_classes: int, mlp_ratio: float = 4, drop_rate: float = 0.0):
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation("squaredrelu")
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.head_drop(self.norm(self.act(self.fc1(x)))))


class ClassifierHead(nn.Module):
    """Final norm, global average pool and classifier.

    ``final_norm="map"`` is the official PoolFormer head: GroupNorm(1 group, eps 1e-5) over the whole
    (B, C, H, W) map, then the spatial mean. ``final_norm="pooled"`` is timm's (and the baselines')
    head: mean first, then LayerNorm over C (eps 1e-6). Both hold a [C] weight and bias, so the same
    checkpoint loads into either. ``global_pool=""`` (timm's "no pooling") keeps the normalised map,
    and a classifier then runs at every position: (B, C, H, W) -> (B, num_classes, H, W).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        final_norm: str,
        head: str,
        head_dropout: float,
        drop_rate: float,
        global_pool: str = "avg",
    ):
        super().__init__()
        self.final_norm = final_norm
        self.num_features = dim
        self.num_classes = num_classes
        self.global_pool = check_global_pool(global_pool)
        self.head_type = head
        self.head_dropout = head_dropout
        self.norm = nn.GroupNorm(1, dim, eps=1e-5) if final_norm == "map" else nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._make_fc(num_classes)

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.head_type == "mlp":
            return MlpHead(self.num_features, num_classes, drop_rate=self.head_dropout)
        return nn.Linear(self.num_features, num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) stage-4 map -> (B, C) normalised, pooled features."""
        if self.final_norm == "map":
            return self.norm(x).mean((-2, -1))
        return self.norm(x.mean((-2, -1)))

    def norm_map(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm on the unpooled (B, C, H, W) map: over the whole map, or per position."""
        if self.final_norm == "map":
            return self.norm(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "":
            x = self.drop(self.norm_map(x))
            if pre_logits or self.num_classes == 0:
                return x
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.drop(self.pool(x))
        return x if pre_logits else self.fc(x)


def check_global_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ConfigError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool

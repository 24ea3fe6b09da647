"""Which stage maps a model returns, and how it describes them: timm's feature contract, in torch only.

``FeatureInfo`` has the methods of timm's ``timm.models.FeatureInfo`` (``channels()``, ``reduction()``,
``module_name()``, ``get()``, ``get_dicts()``) so code written for timm's ``features_only`` models works
on ours, while it stays a sequence of dicts: ``info[k]["num_chs"]`` is the k-th returned map's width.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from metaformer.errors import ConfigError
from metaformer.models.layers import DropPath

FEATURE_KEYS = ("num_chs", "reduction", "module")


def take_indices(num_stages: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: ``None`` is every stage, an int ``n`` the last ``n``, a sequence
    the stages it names (negative ones count from the end). Returns the stage indices and the largest."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ConfigError(f"indices={indices} asks for the last {indices} stages; use 1..{num_stages}")
        taken = list(range(num_stages - indices, num_stages))
    else:
        taken = []
        for i in indices:
            i = int(i)
            if not -num_stages <= i < num_stages:
                raise ConfigError(
                    f"stage index {i} is out of range; use 0..{num_stages - 1} or -{num_stages}..-1"
                )
            taken.append(i + num_stages if i < 0 else i)
        if not taken:
            raise ConfigError("indices is empty; name at least one stage")
    return taken, max(taken)


def check_out_indices(indices: int | Sequence[int], num_stages: int) -> tuple[int, ...]:
    """``out_indices`` as distinct increasing non-negative stage indices (negative ones count from the
    end, an int ``n`` means the last ``n``), so what is saved with a backbone is always positive."""
    taken, _ = take_indices(num_stages, indices)
    if taken != sorted(set(taken)):
        raise ConfigError(
            f"out_indices must name distinct stages in increasing order (0..{num_stages - 1}, or "
            f"-{num_stages}..-1), got {tuple(indices) if not isinstance(indices, int) else indices}"
        )
    return tuple(taken)


class FeatureInfo(Sequence):
    """One dict per returned map (``num_chs``, ``reduction``, ``module``, ``index``: the stage), with
    timm's ``FeatureInfo`` methods. Without ``idx`` a method answers for every returned map, in order."""

    def __init__(self, info: Sequence[dict[str, Any]]):
        previous = 1
        entries = []
        for k, entry in enumerate(info):
            if any(key not in entry for key in FEATURE_KEYS) or entry["num_chs"] <= 0:
                raise ConfigError(f"feature_info entry {k} needs {', '.join(FEATURE_KEYS)}, got {entry}")
            if entry["reduction"] < previous:
                raise ConfigError(
                    f"feature_info reductions must not shrink, got {entry['reduction']} after {previous}"
                )
            previous = entry["reduction"]
            entries.append({"index": k, **entry})
        self.info = entries
        self.out_indices = tuple(range(len(entries)))

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [entry[key] for entry in self.info]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None
    ) -> list[dict[str, Any]] | dict[str, Any]:
        def pick(entry: dict[str, Any]) -> dict[str, Any]:
            return dict(entry) if keys is None else {key: entry[key] for key in keys}

        if idx is None:
            return [pick(entry) for entry in self.info]
        if isinstance(idx, (list, tuple)):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def __getitem__(self, item: Any) -> Any:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info})"


class MetaFormerFeatureGetter(nn.Module):
    """timm's ``feature_cls='getter'``: the (pruned) classifier's ``forward_intermediates`` as the forward.

    The model keeps its own parameter names under ``model.``; ``norm=True`` puts the final norm on the
    last map, as ``forward_intermediates(norm=True)`` does.
    """

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] = (0, 1, 2, 3), norm: bool = False):
        super().__init__()
        num_stages = len(model.stages)
        self.out_indices = check_out_indices(out_indices, num_stages)
        self.norm = norm
        self.feature_info = FeatureInfo([model.feature_info[i] for i in self.out_indices])
        model.prune_intermediate_layers(list(self.out_indices), prune_norm=not norm, prune_head=True)
        self.model = model
        self.in_chans = model.in_chans
        self.img_size = model.img_size

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=list(self.out_indices), norm=self.norm, stop_early=True, intermediates_only=True
        )


class _Tracer(torch.fx.Tracer):
    """Keeps ``DropPath`` whole: its train/eval branch must run when called, not when traced."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, DropPath) or super().is_leaf_module(m, module_qualified_name)


def trace_features(features: nn.Module) -> torch.fx.GraphModule:
    """timm's ``feature_cls='fx'``: a features backbone as a ``torch.fx.GraphModule`` (for graph edits
    such as FX quantisation, and TorchScript). Blocks trace to plain torch ops; parameter names stay.
    Stochastic depth stays a module call, so it follows ``train()``/``eval()`` as in the eager model;
    the graph keeps ``feature_info``, ``out_indices`` and ``pretrained_cfg``."""
    graph = torch.fx.GraphModule(features, _Tracer().trace(features), type(features).__name__)
    for name in ("feature_info", "out_indices", "out_norm", "in_chans", "img_size", "pretrained_cfg"):
        setattr(graph, name, getattr(features, name))
    graph.default_cfg = graph.pretrained_cfg
    for name in ("model_name", "model_config"):
        if hasattr(features, name):
            setattr(graph, name, getattr(features, name))
    return graph

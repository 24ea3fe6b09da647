"""Numerical parity with timm for every MetaFormer variant timm has, through our checkpoint loader.

A timm model with every parameter randomised (layer and res scales included: at their 1e-5 init a
broken mixer would move outputs by ~1e-5 and still pass) is saved in timm layout and in the official
layout, and each file is loaded with ``create_model(name, checkpoint_path=...)``.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import metaformer.models.metaformer as metaformer_module
from metaformer import create_model
from metaformer.weights import to_baselines_keys, to_official_keys

RTOL = 1e-5
V1 = [f"poolformer_{s}" for s in ("s12", "s24", "s36", "m36", "m48")]
V2 = [f"poolformerv2_{s}" for s in ("s12", "s24", "s36", "m36", "m48")]
BASELINES = [f"{family}_{s}" for family in ("convformer", "caformer") for s in ("s18", "s36", "m36", "b36")]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def nan_init(monkeypatch):
    """Build our models with every parameter NaN instead of random init (the slow part of building
    m48/b36); anything the checkpoint fails to overwrite then shows up as NaN outputs."""

    def fill_nan(module: torch.nn.Module) -> None:
        with torch.no_grad():
            for param in module.parameters(recurse=False):
                param.fill_(float("nan"))

    monkeypatch.setattr(metaformer_module, "_init_weights", fill_nan)
    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", lambda self: None)
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: None)


def random_timm_model(name: str) -> torch.nn.Module:
    """timm's model built without init (meta device), then every parameter drawn at random."""
    with torch.device("meta"):
        model = timm.create_model(name)
    model = model.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            noise = torch.rand(param.shape, generator=generator) * 2 - 1  # uniform: faster than randn
            if param.ndim == 1 and (pname.endswith("scale") or pname.endswith("weight")):
                param.copy_(1 + 0.3 * noise)  # layer/res scales, StarReLU scales, norm weights
            elif param.ndim == 1 or pname.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(0.05 * noise)
    return model


def official_head(features: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """sail-sg/poolformer's head: GroupNorm(1, eps 1e-5) over the map, spatial mean, linear."""
    x = F.group_norm(features, 1, state["head.norm.weight"], state["head.norm.bias"], eps=1e-5)
    return F.linear(x.mean((-2, -1)), state["head.fc.weight"], state["head.fc.bias"])


def load(name: str, path, **kwargs) -> torch.nn.Module:
    model = create_model(name, checkpoint_path=path, **kwargs).eval()
    path.unlink()  # the big files add up: drop each as soon as it is loaded
    return model


@pytest.mark.parametrize("name", V1)
def test_poolformer_v1_matches_timm_from_timm_and_official_layouts(name, tmp_path, nan_init):
    reference = random_timm_model(name)
    state = reference.state_dict()
    torch.save(state, tmp_path / "timm.pth")
    torch.save(to_official_keys(state), tmp_path / "official.pth.tar")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref_features = reference.forward_features(x)
        ref_logits = reference.forward_head(ref_features)
        official_logits = official_head(ref_features, state)
        # default head (final_norm="map", the official one) from the timm-layout file
        ours = load(name, tmp_path / "timm.pth")
        assert rel_err(ours.forward_features(x), ref_features) <= RTOL
        assert rel_err(ours(x), official_logits) <= RTOL
        del ours
        # timm's head (final_norm="pooled") from the official-layout file
        pooled = load(name, tmp_path / "official.pth.tar", final_norm="pooled")
        assert rel_err(pooled.forward_features(x), ref_features) <= RTOL
        assert rel_err(pooled(x), ref_logits) <= RTOL
    # the two heads really differ, so the checks above tell them apart
    assert rel_err(official_logits, ref_logits) > 1e-3


@pytest.mark.parametrize("name", V2 + BASELINES)
def test_baselines_match_timm(name, tmp_path, nan_init):
    reference = random_timm_model(name)
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref_features = reference.forward_features(x)
        ref_logits = reference.forward_head(ref_features)
        ours = load(name, tmp_path / "timm.pth")
        assert rel_err(ours.forward_features(x), ref_features) <= RTOL
        assert rel_err(ours(x), ref_logits) <= RTOL


@pytest.mark.parametrize("name", ["convformer_s18", "caformer_s18"])
def test_official_baselines_layout_round_trip_matches_timm(name, tmp_path, nan_init):
    reference = random_timm_model(name)
    official = to_baselines_keys(reference.state_dict())
    # channels-last Linear weights in the file, as sail-sg/metaformer saves them
    assert official["stages.0.0.mlp.fc1.weight"].ndim == 2
    assert official["stages.0.0.token_mixer.pwconv1.weight"].ndim == 2
    torch.save(official, tmp_path / f"{name}.pth")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = load(name, tmp_path / f"{name}.pth")
        assert rel_err(ours(x), reference(x)) <= RTOL

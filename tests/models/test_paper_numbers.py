"""Parameter and MAC counts against PAPER.md (exact counts section 2.1; MACs are fvcore counts)."""

import pytest
import torch

from metaformer import create_model
from metaformer.complexity import count_macs, count_params
from metaformer.models import get_variant

# PAPER.md 2.1: exact params (with the 1000-class head) and the paper's MACs at 224
POOLFORMERS = {
    "poolformer_s12": (11_915_176, 1.8),
    "poolformer_s24": (21_388_968, 3.4),
    "poolformer_s36": (30_862_760, 5.0),
    "poolformer_m36": (56_172_520, 8.8),
    "poolformer_m48": (73_473_448, 11.6),
}
# timm's fvcore GMACs (PAPER.md 2.1, [T]) to two decimals
TIMM_GMACS = {"poolformer_s12": 1.82, "poolformer_s24": 3.41, "poolformer_s36": 5.00, "poolformer_m36": 8.80,
              "poolformer_m48": 11.59}  # fmt: skip
BASELINES = {  # PAPER.md 2.2, 8.6, 8.7
    "poolformerv2_s12": 11_891_712,
    "poolformerv2_m48": 73_346_056,
    "identityformer_s12": 11_891_712,
    "randformer_s12": 11_891_712 + 235_298,
    "convformer_s18": 26_774_448,
    "caformer_s18": 26_341_656,
    "convformer_b36": 99_882_616,
    "caformer_b36": 98_753_614,
}


@pytest.mark.parametrize("name", POOLFORMERS)
def test_poolformer_params_and_macs_match_the_paper(name):
    params, paper_gmacs = POOLFORMERS[name]
    model = create_model(name)
    assert count_params(model) == params
    assert params / 1e6 == pytest.approx(get_variant(name).paper_params_m, abs=0.1)  # paper: 0.1 M digits
    gmacs = count_macs(model, 224) / 1e9
    assert gmacs == pytest.approx(TIMM_GMACS[name], abs=0.005)
    assert gmacs == pytest.approx(paper_gmacs, abs=0.05)


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_params_match_paper_md(name):
    assert count_params(create_model(name)) == BASELINES[name]


def test_our_mac_counter_equals_fvcore():
    fvcore = pytest.importorskip("fvcore.nn")
    model = create_model("poolformer_s12").eval()
    analysis = fvcore.FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    assert count_macs(model, 224) == analysis.total()


def test_caformer_macs_include_the_attention_products():
    # timm's benchmark lists 4.13 GMACs for CAFormer-S18; without q@k and attn@v it would be 3.90
    assert count_macs(create_model("caformer_s18"), 224) / 1e9 == pytest.approx(4.13, abs=0.01)


def test_mac_count_ignores_route_probes(monkeypatch, tmp_path):
    """With probing on and no cached routes, the first forward measures its routes: those timing runs
    must not be counted (they once made convformer_s18 read 7.7 G instead of 3.96 G)."""
    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    model = create_model("convformer_s18").eval()
    first = count_macs(model, 224)
    assert first / 1e9 == pytest.approx(3.96, abs=0.01)
    assert count_macs(model, 224) == first
    assert not any(tmp_path.rglob("*.json")), "counting measured and cached a route"

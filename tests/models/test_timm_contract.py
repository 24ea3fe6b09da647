"""timm's model contract on every family: heads and pooling, pretrained_cfg, features_only with
FeatureInfo, forward_intermediates, FX (symbolic_trace and torchvision's create_feature_extractor),
TorchScript and torch.export. Tiny widths and 64 px inputs keep each family under a few seconds."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torchvision.models.feature_extraction import create_feature_extractor

from metaformer import create_model
from metaformer.errors import ConfigError
from metaformer.models.features import FeatureInfo
from metaformer.models.metaformer import MetaFormerBlock

SIZE = 64
TINY = {"depths": (1, 1, 1, 1), "dims": (32, 32, 64, 64)}
FAMILIES = {  # one model per family, and an attention hybrid from the paper's ablations
    "poolformer": ("poolformer_s12", {}),
    "poolformerv2": ("poolformerv2_s12", {}),
    "convformer": ("convformer_s18", {}),
    "caformer": ("caformer_s18", {}),
    "identityformer": ("identityformer_s12", {}),
    "randformer": ("randformer_s12", {"img_size": SIZE}),
    "hybrid_ppaa": ("metaformer_ppaa_s12_224", {"mixers": ("pooling", "pooling", "attention", "attention")}),
}


def _model(family: str, **kwargs) -> torch.nn.Module:
    name, extra = FAMILIES[family]
    return create_model(name, **TINY, **extra, **kwargs).eval()


def _input(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE)


@pytest.mark.parametrize("family", FAMILIES)
def test_pooling_off_keeps_the_normalised_map_and_pre_logits_width_is_head_hidden_size(family):
    model = _model(family, num_classes=5)
    x = _input()
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)
        model.reset_classifier(0, "")
        unpooled = model(x)
        built = _model(family, num_classes=0, global_pool="")
        built.load_state_dict(model.state_dict())
        torch.testing.assert_close(built(x), unpooled)
    assert unpooled.shape == (2, model.num_features, SIZE // 32, SIZE // 32)
    if model.head.final_norm == "map":  # the official head: norm over the map, then the mean
        torch.testing.assert_close(unpooled.mean((-2, -1)), pre)


def test_classifier_without_pooling_runs_per_position_and_equals_pooled_logits_on_a_constant_map():
    model = _model("convformer", num_classes=4)  # the per-position LayerNorm head and the MLP classifier
    x = torch.randn(1, model.num_features, 1, 1).expand(1, model.num_features, 3, 3)
    with torch.no_grad():
        pooled = model.forward_head(x)
        classifier = model.head.fc.state_dict()
        model.reset_classifier(4, "")
        model.head.fc.load_state_dict(classifier)
        per_position = model.forward_head(x)
    assert per_position.shape == (1, 4, 3, 3)
    torch.testing.assert_close(per_position, pooled[:, :, None, None].expand(1, 4, 3, 3))


def test_unknown_global_pool_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="'avg' or ''"):
        _model("poolformer", global_pool="token")


@pytest.mark.parametrize("family", ["poolformer", "caformer", "randformer"])
def test_pretrained_cfg_gives_timm_our_preprocessing_and_real_parameter_names(family):
    timm_data = pytest.importorskip("timm.data")
    model = _model(family)
    config = timm_data.resolve_data_config(model=model)
    assert config["crop_pct"] == model.pretrained_cfg["crop_pct"]
    assert model.default_cfg is model.pretrained_cfg
    names = model.state_dict().keys()
    assert f"{model.pretrained_cfg['first_conv']}.weight" in names
    assert f"{model.pretrained_cfg['classifier']}.weight" in names
    assert model.pretrained_cfg["fixed_input_size"] == (family == "randformer")


@pytest.mark.parametrize(("name", "crop"), [("poolformer_m36", 0.95), ("poolformerv2_s12", 1.0)])
def test_pretrained_cfg_holds_the_preprocessing_of_the_released_weights(name, crop):
    timm_data = pytest.importorskip("timm.data")
    model = create_model(name, **TINY)
    assert timm_data.resolve_data_config(model=model)["crop_pct"] == crop


def test_pretrained_cfg_without_released_weights_is_our_recipe_crop_0_9(monkeypatch):
    from metaformer.weights import pretrained

    monkeypatch.delitem(pretrained.DEFAULT_TAGS, "poolformer_m36")
    cfg = create_model("poolformer_m36", **TINY).pretrained_cfg
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic" and cfg["tag"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_features_only_maps_match_feature_info_and_negative_indices_count_from_the_end(family):
    features = _model(family, features_only=True, out_indices=(-3, -1))
    assert features.out_indices == (1, 3)  # stored (and saved) non-negative
    info = features.feature_info
    assert isinstance(info, FeatureInfo)
    assert info.channels() == [TINY["dims"][1], TINY["dims"][3]]
    assert info.reduction() == [8, 32]
    assert info.module_name() == ["stages.1", "stages.3"]
    assert info[1]["num_chs"] == TINY["dims"][3] and len(info) == 2  # list access: one dict per map
    with torch.no_grad():
        maps = features(_input())
    assert [m.shape[1] for m in maps] == info.channels()
    assert [m.shape[-1] for m in maps] == [SIZE // r for r in info.reduction()]


@pytest.mark.parametrize("family", FAMILIES)
def test_getter_features_equal_forward_intermediates_of_the_classifier(family):
    classifier = _model(family)
    getter = _model(family, features_only=True, feature_cls="getter", out_indices=(0, 2))
    getter.model.load_state_dict(classifier.state_dict(), strict=False)
    x = _input()
    with torch.no_grad():
        want = classifier.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        got = getter(x)
    assert getter.feature_info.channels() == [m.shape[1] for m in want]
    assert len(getter.model.stages) == 3  # pruned after the last index
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_feature_cfg_is_timms_spelling_and_unknown_keys_are_refused():
    cfg = {"feature_cls": "getter", "out_indices": 2}
    features = _model("poolformer", features_only=True, feature_cfg=cfg)
    assert features.out_indices == (2, 3)  # an int n: the last n stages, as timm
    with pytest.raises(ConfigError, match="flatten_sequential"):
        _model("poolformer", features_only=True, feature_cfg={"flatten_sequential": True})


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_intermediates_returns_the_final_map_and_the_asked_stages(family):
    model = _model(family)
    x = _input()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        early, _ = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert [m.shape[1] for m in maps] == list(TINY["dims"])
    for a, b in zip(last_two, maps[2:], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(normed[0], model.head.norm_map(maps[-1]))
    torch.testing.assert_close(early, maps[1])  # stop_early: the last stage run is the last asked for


def test_forward_intermediates_refuses_other_formats_and_out_of_range_indices():
    model = _model("poolformer")
    with pytest.raises(ConfigError, match="NCHW"):
        model.forward_intermediates(_input(), output_fmt="NHWC")
    with pytest.raises(ConfigError, match=r"0\.\.3 or -4\.\.-1"):
        model.forward_intermediates(_input(), indices=[4])


def test_prune_intermediate_layers_drops_later_stages_and_the_classifier():
    model = _model("poolformerv2", num_classes=5)
    assert model.prune_intermediate_layers([1]) == [1]
    assert len(model.stages) == 2 and model.num_classes == 0
    with torch.no_grad():
        assert model.forward_intermediates(_input(), intermediates_only=True)[-1].shape[1] == TINY["dims"][1]


@pytest.mark.parametrize("family", FAMILIES)
def test_fx_symbolic_trace_and_create_feature_extractor_match_eager(family):
    model = _model(family)
    x = _input()
    traced = torch.fx.symbolic_trace(model)
    extractor = create_feature_extractor(model, return_nodes={"stages.1": "s1", "stages.3": "s3"})
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
        maps = extractor(x)
        _, want = model.forward_intermediates(x, indices=[1, 3])
    torch.testing.assert_close(maps["s1"], want[0])
    torch.testing.assert_close(maps["s3"], want[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_and_torchscript_match_eager(family):
    model = _model(family)
    x = _input()
    exported = torch.export.export(model, (x,))
    scripted = torch.jit.script(model)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(exported.module()(x), want)
        torch.testing.assert_close(scripted(x), want)


def test_timm_create_model_builds_ours_under_the_prefix():
    pytest.importorskip("timm")
    import timm

    from metaformer.timm_registry import register_timm_models

    names = register_timm_models("poolformer_s12")
    assert names == ["mf_poolformer_s12"] and register_timm_models("poolformer_s12") == names
    model = timm.create_model("mf_poolformer_s12", **TINY, num_classes=3)
    ours = create_model("poolformer_s12", **TINY, num_classes=3)
    assert model.state_dict().keys() == ours.state_dict().keys()
    assert timm.models.get_pretrained_cfg_value("mf_poolformer_s12", "crop_pct") == 0.9
    # timm's FX tracing keeps blocks whole, so their kernel routing runs as in the eager model
    assert MetaFormerBlock in timm.models.get_notrace_modules()


def test_fx_features_are_a_scriptable_graph_with_the_backbones_outputs_and_parameter_names():
    backbone = _model("caformer", features_only=True, out_indices=(1, 3), out_norm=True)
    graph = _model("caformer", features_only=True, out_indices=(1, 3), out_norm=True, feature_cls="fx")
    assert isinstance(graph, torch.fx.GraphModule)
    assert graph.state_dict().keys() == backbone.state_dict().keys()
    graph.load_state_dict(backbone.state_dict())
    assert graph.feature_info.channels() == backbone.feature_info.channels()
    x = _input()
    with torch.no_grad():
        for got, want in zip(torch.jit.script(graph)(x), backbone(x), strict=True):
            torch.testing.assert_close(got, want)
        dropping = _model("caformer", features_only=True, feature_cls="fx", drop_path_rate=0.5).train()
        # stochastic depth follows train()/eval() at call time, as in the eager backbone
        assert not torch.equal(dropping(x)[-1], dropping.eval()(x)[-1])


@pytest.mark.parametrize("family", ["poolformerv2", "convformer", "caformer"])
def test_the_inference_fast_path_traces_with_fx_to_plain_ops(family):
    from metaformer.models.fast import optimize_for_inference

    fast = optimize_for_inference(_model(family))  # folded blocks, chunking, kernel and oneDNN routes
    x = _input()
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(fast)(x), fast(x), rtol=1e-5, atol=1e-5)


def test_negative_out_indices_are_saved_non_negative_and_the_backbone_rebuilds(tmp_path):
    from metaformer.weights import model_from_weights, read_metadata, save_weights

    features = _model("poolformer", features_only=True, out_indices=(-2, -1), out_norm=True)
    path = tmp_path / "backbone.safetensors"
    save_weights(features, path)
    assert read_metadata(path)["features"]["out_indices"] == [2, 3]
    rebuilt = model_from_weights(path).eval()
    assert rebuilt.out_indices == (2, 3) and list(rebuilt.state_dict()) == list(features.state_dict())

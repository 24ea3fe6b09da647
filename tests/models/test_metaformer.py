"""Properties of every registered variant and of the generic MetaFormer class."""

import closed_form
import pytest
import torch
from torch import nn

from metaformer import ConfigError, InputSizeError, UnknownModelError, create_model, list_models
from metaformer.models import VARIANTS, get_variant, stage_grid_sizes

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
FIXED_GRID = {n for n, v in VARIANTS.items() if {"random", "spatial_mlp"} & set(v.config.mixers)}


def _build(name: str, size: tuple[int, int], **kw) -> nn.Module:
    extra = {"img_size": size} if name in FIXED_GRID else {}
    return create_model(name, **extra, **kw).eval()


@pytest.mark.parametrize("name", list_models())
def test_logits_and_stage_maps_match_feature_info(name):
    # real widths, mixers, norms and heads; one block per stage keeps the registry sweep fast
    model = _build(name, (64, 64), num_classes=7, depths=(1, 1, 1, 1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 7)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == len(model.feature_info) == 4
    for fmap, info in zip(maps, model.feature_info, strict=True):
        assert fmap.shape[1] == info["num_chs"]
        assert fmap.shape[-2:] == (64 // info["reduction"], 64 // info["reduction"])


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18"])
@pytest.mark.parametrize("size", [(33, 47), (65, 97), (100, 61)])
def test_odd_non_square_inputs_run(name, size):
    model = create_model(name, **TINY, num_classes=3).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 3, *size), intermediates_only=True)
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 3)
    assert [tuple(m.shape[-2:]) for m in maps] == stage_grid_sizes(size)


@pytest.mark.parametrize("name", ["randformer_s12", "metaformer_pppf_s12_224"])
def test_fixed_grid_models_reject_other_sizes_and_say_which(name):
    model = create_model(name, **TINY).eval()
    with pytest.raises(InputSizeError, match=r"takes 224x224 inputs only.*got 96x96.*img_size=\(96, 96\)"):
        model(torch.randn(1, 3, 96, 96))
    assert create_model(name, **TINY, img_size=(96, 128)).eval()(torch.randn(1, 3, 96, 128)).shape == (
        1,
        1000,
    )


def test_fixed_grid_mixer_checks_its_grid_even_without_the_model_check():
    mixer = create_model("randformer_s12", **TINY).stages[3].blocks[0].token_mixer
    with pytest.raises(InputSizeError, match="fixed 7x7 token grid"):
        mixer(torch.randn(1, 64, 3, 3))


def test_too_small_input_and_wrong_channels_fail_clearly():
    model = create_model("poolformer_s12", **TINY).eval()
    with pytest.raises(InputSizeError, match="at least 32x32"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(InputSizeError, match="in_chans"):
        model(torch.randn(1, 1, 64, 64))
    assert create_model("poolformer_s12", **TINY, in_chans=1)(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


FAMILY_REPRESENTATIVES = [
    "poolformer_s12",
    "poolformerv2_s12",
    "identityformer_s12",
    "randformer_s12",
    "convformer_s18",
    "caformer_s18",
    "metaformer_pppa_s12_224",
    "metaformer_ppff_s12_224",
]


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_backward_reaches_every_trainable_parameter(name):
    model = create_model(name, **TINY, img_size=64, num_classes=5, drop_path_rate=0.0)
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == []


@pytest.mark.parametrize("name", FAMILY_REPRESENTATIVES)
def test_eval_mode_is_deterministic(name):
    model = create_model(name, **TINY, img_size=64, drop_path_rate=0.5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_random_mixing_matrix_is_frozen_row_stochastic():
    model = create_model("randformer_s12", **TINY, img_size=64)
    mixer = model.stages[2].blocks[0].token_mixer
    assert not mixer.random_matrix.requires_grad
    assert mixer.random_matrix.shape == (16, 16)  # 4x4 grid at stage 3 for 64x64 input
    torch.testing.assert_close(mixer.random_matrix.sum(-1), torch.ones(16))


def test_drop_path_rates_rise_linearly_over_all_blocks():
    model = create_model("poolformer_s12", drop_path_rate=0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for stage in model.stages for b in stage.blocks]
    assert len(rates) == 12
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 12))


def test_default_drop_path_is_the_papers_rate():
    model = create_model("poolformer_m36")
    assert model.stages[3].blocks[-1].drop_path1.drop_prob == pytest.approx(
        get_variant("poolformer_m36").drop_path_rate
    )
    assert model.stages[3].blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


def test_hybrid_stage_plan_is_one_config_row():
    model = create_model("poolformer_s12", **TINY, mixers=("pooling", "pooling", "attention", "attention"))
    assert [s.tokens for s in model.stages] == [False, False, True, True]
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1000)


@pytest.mark.parametrize(
    "norm", ["groupnorm1", "groupnorm1_nobias", "layernorm", "layernorm_nobias", "batchnorm", "none"]
)
@pytest.mark.parametrize("mixers", [("pooling",) * 4, ("pooling", "pooling", "attention", "attention")])
def test_every_norm_works_in_map_and_token_stages(norm, mixers):
    model = create_model("poolformer_s12", **TINY, norms=norm, mixers=mixers).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("act", ["gelu", "relu", "silu", "starrelu"])
def test_activations_are_swappable(act):
    model = create_model("poolformer_s12", **TINY, act=act)
    assert type(model.stages[0].blocks[0].mlp.act).__name__.lower() == act
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def _checkpointed_step(model: nn.Module, x: torch.Tensor, monkeypatch) -> tuple[int, int, int]:
    """(block forwards during the forward pass, block forwards during backward, bytes autograd saved
    for backward outside checkpointed blocks: what the graph holds at the end of the forward).
    The block's forward is counted itself: a recomputation does not run module hooks."""
    from metaformer.models.metaformer import MetaFormerBlock

    calls: list[int] = []
    real = MetaFormerBlock.forward
    monkeypatch.setattr(MetaFormerBlock, "forward", lambda self, t: calls.append(1) or real(self, t))
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else sum(o.sum() for o in out)
    forward_calls = len(calls)
    out.sum().backward()
    monkeypatch.setattr(MetaFormerBlock, "forward", real)
    return forward_calls, len(calls) - forward_calls, sum(saved)


@pytest.mark.parametrize("features_only", [False, True])
def test_grad_checkpointing_recomputes_every_block_and_holds_less_for_backward(features_only, monkeypatch):
    model = create_model("poolformer_s12", **TINY, drop_path_rate=0.0, features_only=features_only)
    blocks = sum(len(stage.blocks) for stage in model.stages)
    x = torch.randn(2, 3, 64, 64)
    forward, backward, full_bytes = _checkpointed_step(model, x, monkeypatch)
    assert (forward, backward) == (blocks, 0)
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    forward, backward, checkpointed_bytes = _checkpointed_step(model, x, monkeypatch)
    assert (forward, backward) == (blocks, blocks)  # each block runs again in the backward pass
    assert checkpointed_bytes < 0.5 * full_bytes  # only the blocks' inputs are kept
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)  # and the gradients are the same
    model.set_grad_checkpointing(False)
    assert _checkpointed_step(model, x, monkeypatch)[1] == 0


def test_features_only_returns_requested_stages_with_optional_out_norm():
    model = create_model("poolformer_s12", **TINY, features_only=True, out_indices=(1, 3), out_norm=True)
    maps = model(torch.randn(1, 3, 128, 96))
    assert [m.shape[1] for m in maps] == model.out_channels == [16, 64]
    assert model.strides == [8, 32]
    assert [tuple(m.shape[-2:]) for m in maps] == [(16, 12), (4, 3)]
    keys = set(model.state_dict())
    assert {"out_norms.0.weight", "out_norms.1.bias"} <= keys
    assert not any(k.startswith("head.") for k in keys)


def test_features_without_out_norm_equal_the_classifier_stage_maps():
    features = create_model("poolformer_s12", **TINY, features_only=True).eval()
    classifier = create_model("poolformer_s12", **TINY).eval()
    classifier.load_state_dict(features.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = classifier.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(features(x), maps, strict=True):
            torch.testing.assert_close(a, b)


def test_bad_out_indices_name_the_valid_range():
    with pytest.raises(ConfigError, match=r"0\.\.3"):
        create_model("poolformer_s12", **TINY, features_only=True, out_indices=(2, 4))


def test_unknown_model_names_close_matches():
    with pytest.raises(UnknownModelError, match="did you mean 'poolformer_s12'"):
        create_model("poolfomer_s12")


def test_unknown_override_lists_valid_options():
    with pytest.raises(ConfigError, match="unknown model option.*valid options are .*depths"):
        create_model("poolformer_s12", dept=(1, 1, 1, 1))


@pytest.mark.parametrize(
    "override, message",
    [
        ({"mixers": "pool"}, "unknown token mixer 'pool'.*did you mean 'pooling'"),
        ({"norms": "groupnorm"}, "unknown norm 'groupnorm'"),
        ({"act": "gelu2"}, "unknown activation"),
        ({"final_norm": "both"}, "final_norm"),
        ({"mixers": ("pooling",) * 3}, "3 entries but the model has 4 stages"),
        ({"mixer_kwargs": {"pool_size": 4}}, "pool_size must be an odd"),
    ],
)
def test_bad_config_values_fail_with_one_sentence(override, message):
    with pytest.raises(ConfigError, match=message):
        create_model("poolformer_s12", **TINY, **override)


def test_list_models_filters_with_shell_patterns():
    assert list_models("poolformer_*") == [f"poolformer_{s}" for s in ("m36", "m48", "s12", "s24", "s36")]
    assert "caformer_b36" in list_models()
    assert list_models("nothing*") == []


def test_reset_classifier_replaces_only_the_classifier():
    model = create_model("convformer_s18", **TINY)
    norm = model.head.norm.weight.clone()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert torch.equal(norm, model.head.norm.weight)


def test_equal_adjacent_widths_still_downsample_so_grids_match_the_formula():
    model = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 16, 32, 32)).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert (
        [tuple(m.shape[-2:]) for m in maps]
        == stage_grid_sizes((64, 64))
        == [(16, 16), (8, 8), (4, 4), (2, 2)]
    )


def _layer_scales(model: nn.Module, **kw) -> dict[str, tuple[float, float]]:
    """Parameter name -> (lr scale, weight decay) in timm's own layer-decay groups."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, no_weight_decay_list=model.no_weight_decay(), **kw)
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_timm_layer_decay_gives_poolformer_s12_one_rising_lr_scale_per_block():
    model = create_model("poolformer_s12", num_classes=5)
    scales = _layer_scales(model, weight_decay=0.05, layer_decay=0.5)
    per_layer = {}
    for name, (scale, _) in scales.items():
        if name.startswith("stem"):
            key = "stem"
        elif name.startswith("head"):
            key = "head"
        else:
            stage, kind, block = name.split(".")[1:4]
            key = (int(stage), 0 if kind == "downsample" else int(block))  # a downsampling joins block 0
        per_layer.setdefault(key, set()).add(scale)
    assert all(len(s) == 1 for s in per_layer.values())  # one scale per layer
    blocks = sorted(k for k in per_layer if isinstance(k, tuple))
    assert len(blocks) == sum(model.depths) == 12
    order = [per_layer["stem"].pop()] + [per_layer[k].pop() for k in blocks] + [per_layer["head"].pop()]
    assert order == [0.5 ** (13 - i) for i in range(14)]  # stem, 12 blocks, head: rising to 1.0


def test_no_weight_decay_on_norms_biases_and_scales_only():
    model = create_model("poolformer_s12", **TINY, num_classes=5, res_scale_init=1.0, act="starrelu")
    scales = _layer_scales(model, weight_decay=0.05, layer_decay=0.7, weight_decay_exclude_1d=False)
    decayed = {name for name, (_, wd) in scales.items() if wd > 0}
    kinds = {name.split(".")[-2] + "." + name.split(".")[-1] for name in scales}
    assert {"norm1.weight", "layer_scale1.scale", "res_scale1.scale", "fc1.bias", "act.scale"} <= kinds
    for name in scales:
        assert (name in decayed) == (name.endswith(".weight") and "norm" not in name), name
    assert decayed and all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_coarse_groups_are_stem_stages_head_and_positional_embeddings_join_their_stage():
    from timm.models import group_parameters

    model = create_model("metaformer_ppaa_s12_224", **TINY, num_classes=3)
    layers = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert max(layers.values()) == 5  # stem, 4 stages, head
    fine = group_parameters(model, model.group_matcher(), reverse=True)
    pos = [n for n in fine if "pos_embed" in n]
    assert pos and all(fine[n] == fine[n.replace("pos_embed", "blocks.0.norm1.weight")] for n in pos)
    assert "pos_embed" in " ".join(model.no_weight_decay())


def test_timm_optimizer_factory_layer_decay_on_the_features_backbone():
    from timm.optim import create_optimizer_v2

    backbone = create_model("poolformer_s12", **TINY, features_only=True, out_norm=True)
    optimizer = create_optimizer_v2(backbone, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    assert sorted({g["lr_scale"] for g in optimizer.param_groups}) == [0.8**i for i in range(5, -1, -1)]
    assert all(
        g["weight_decay"] == 0 for g in optimizer.param_groups if all(p.ndim == 1 for p in g["params"])
    )


# --------------------------------------------------------------------------- against the closed form
# Every family, norm, activation and mixer against tests/models/closed_form.py (the formulas written with
# torch.nn.functional, parameters read by name): in float64, where a wrong eps (1e-5 for 1e-6 moves the
# outputs ~1e-6), a dropped bias or a missing position embedding is far above the 1e-10 tolerance.
def _closed_form_check(model: nn.Module, size: int = 64) -> None:
    model = closed_form.randomize(model).double().eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        got_maps, got = model.forward_intermediates(x, intermediates_only=True), model(x)
        want_maps, want = closed_form.features(model, x), closed_form.forward(model, x)
    for i, (a, b) in enumerate(zip(got_maps, want_maps, strict=True)):
        assert closed_form.rel_err(a, b) < 1e-10, f"stage {i}"
    assert closed_form.rel_err(got, want) < 1e-10


@pytest.mark.parametrize(
    "name", FAMILY_REPRESENTATIVES + ["metaformer_pppf_s12_224", "metaformer_ppaa_s12_224"]
)
def test_every_family_equals_the_closed_form(name):
    _closed_form_check(create_model(name, **TINY, img_size=64, num_classes=5))


@pytest.mark.parametrize(
    "norm", ["groupnorm1", "groupnorm1_nobias", "layernorm", "layernorm_nobias", "batchnorm"]
)
@pytest.mark.parametrize("mixers", [("pooling",) * 4, ("pooling", "pooling", "attention", "attention")])
def test_every_norm_equals_the_closed_form_in_map_and_token_stages(norm, mixers):
    _closed_form_check(create_model("poolformer_s12", **TINY, num_classes=5, norms=norm, mixers=mixers,
                                    stem_norm=norm, downsample_norm=norm))  # fmt: skip


@pytest.mark.parametrize("act", ["gelu", "relu", "silu", "starrelu", "squaredrelu"])
def test_every_activation_equals_the_closed_form(act):
    _closed_form_check(create_model("poolformer_s12", **TINY, num_classes=5, act=act))


def test_the_position_embedding_is_added_before_the_attention_stage():
    model = (
        closed_form.randomize(create_model("metaformer_pppa_s12_224", **TINY, img_size=64)).double().eval()
    )
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        with_embedding = model(x)
        model.stages[3].pos_embed.zero_()
        without = model(x)
    assert closed_form.rel_err(with_embedding, without) > 1e-3  # the embedding matters at this scale
    assert closed_form.rel_err(without, closed_form.forward(model, x)) < 1e-10

"""The inference fast path gives the plain model's outputs, for every mixer family and input size."""

import copy

import closed_form
import pytest
import torch
from torch import nn

from metaformer import ConfigError, create_model, optimize_for_inference
from metaformer.models import fast, kernels
from metaformer.models.layers import StarReLU

SMALL = {"depths": (1, 1, 2, 1), "dims": (16, 32, 48, 64), "num_classes": 10}
# name -> the folded block type every block must become (so the test checks folds, not fallbacks)
FAMILIES = {
    "poolformer_s12": {"FoldedPoolBlock"},
    "poolformerv2_s12": {"FoldedPoolBlock"},  # bias-free GroupNorm, StarReLU, ResScale
    "convformer_s18": {"FoldedSepConv"},
    "caformer_s18": {"FoldedSepConv", "FoldedAttention"},
    "identityformer_s12": {"FoldedGenericBlock"},
    "randformer_s12": {"FoldedGenericBlock"},
    "metaformer_pppa_s12_224": {"FoldedGenericBlock", "FoldedAttention"},  # LayerNorm + attention
    "metaformer_ppff_s12_224": {"FoldedPoolBlock", "FoldedGenericBlock"},  # spatial MLP
}


@pytest.fixture(autouse=True)
def _one_thread_small_chunks(monkeypatch):
    """One thread (tiny ops on a shared 2-core machine); chunks of 256 rows so chunking runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(fast, "CHUNK_ROWS", 256)
    yield
    torch.set_num_threads(threads)


def randomize(model: nn.Module) -> nn.Module:
    """Every parameter random (layer scales too: at 1e-5 a broken fold would hide under 1e-5)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            centre = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "scale")) else 0.0
            p.copy_(centre + 0.3 * torch.randn_like(p))
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    return model


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def folded_types(model: nn.Module) -> set[str]:
    return {type(block).__name__ for stage in model.stages for block in stage.blocks}


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("size", [64, 96])
def test_fast_path_equals_plain_model(name, size):
    model = randomize(create_model(name, img_size=size, **SMALL)).eval()
    faster = optimize_for_inference(model)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected, got = model(x), faster(x)
        independent = closed_form.forward(model, x.double())  # the formulas, not the same modules
    assert rel_diff(got, expected) <= 1e-5
    assert closed_form.rel_err(got, independent) <= 1e-5
    assert folded_types(faster) == FAMILIES[name]


def test_negative_starrelu_scale_keeps_sepconv_exact():
    # s * relu(z)^2 only folds into the weights for s >= 0; s < 0 takes the explicit multiply
    model = randomize(create_model("convformer_s18", **SMALL)).eval()
    for module in model.modules():
        if isinstance(module, StarReLU):
            with torch.no_grad():
                module.scale.fill_(-0.7)
    faster = optimize_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(faster(x), model(x)) <= 1e-5
    assert folded_types(faster) == {"FoldedSepConv"}


def test_batchnorm_folds_into_the_mlp():
    model = randomize(create_model("poolformer_s12", norms="batchnorm", **SMALL)).eval()
    faster = optimize_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(faster(x), model(x)) <= 1e-5
    assert faster.stages[0].blocks[0].mlp.norm_kind == "none"  # no normalisation left at all


def test_features_backbone_gives_the_same_maps():
    model = randomize(create_model("poolformer_s12", features_only=True, **SMALL)).eval()
    faster = optimize_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(x), faster(x)
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert rel_diff(a, b) <= 1e-5


def test_chunked_stages_equal_whole_batch(monkeypatch):
    monkeypatch.setenv("METAFORMER_ROUTE_FAST_CHUNK", "chunked")
    model = randomize(create_model("poolformer_s12", **SMALL)).eval()
    x = torch.randn(5, 3, 64, 64)
    chunked = optimize_for_inference(model)
    assert isinstance(chunked.stages[0].blocks, fast.ChunkedBlocks)
    monkeypatch.setattr(fast, "CHUNK_ROWS", 10**9)
    whole = optimize_for_inference(model)
    with torch.no_grad():
        assert torch.allclose(chunked(x), whole(x), rtol=0, atol=1e-6)


def test_input_model_is_left_unchanged():
    model = randomize(create_model("poolformer_s12", **SMALL)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimize_for_inference(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(b).__name__ == "MetaFormerBlock" for s in model.stages for b in s.blocks)


def test_fast_path_keeps_channels_last_and_logits_shape():
    faster = optimize_for_inference(create_model("poolformer_s12", **SMALL))
    with torch.no_grad():
        maps = faster.forward_intermediates(torch.randn(2, 3, 64, 64), intermediates_only=True)
        logits = faster(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 10)
    assert all(m.is_contiguous(memory_format=torch.channels_last) for m in maps)
    assert not any(p.requires_grad for p in faster.parameters())


def test_rejects_other_modules():
    with pytest.raises(ConfigError, match="MetaFormer or MetaFormerFeatures"):
        optimize_for_inference(nn.Linear(2, 2))


def test_compile_option_returns_a_compiled_module(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    compiled = optimize_for_inference(create_model("poolformer_s12", **SMALL), compile=True)
    assert compiled.compiled and compiled.compile_seconds is None  # compiling happens on the first call
    assert folded_types(compiled.module) == {"FoldedPoolBlock"}


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
        ),
    ],
)
@pytest.mark.parametrize("name", ["poolformer_s12", "caformer_s18"])
@pytest.mark.parametrize("mlp_route", ["gemm", "onednn"])
def test_bfloat16_fast_path_follows_the_plain_model(name, device, mlp_route, monkeypatch):
    """bf16 statistics and scales stay bf16 (CUDA's layer-norm kernel returns fp32 statistics). On a CPU
    without native bf16, oneDNN cannot create the fused bf16 primitive: the route falls back."""
    monkeypatch.setenv("METAFORMER_ROUTE_FAST_MLP", mlp_route)
    model = randomize(create_model(name, **SMALL)).eval().to(device=device, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 64, 64, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = model(x).float(), optimize_for_inference(model)(x)
    assert got.dtype == torch.bfloat16
    # bf16 rounding over the network: 3.4e-2 measured on CPU; CUDA's kernels round otherwise and keep
    # the looser bound until measured there (the block-by-block test below is the tight one)
    assert rel_diff(got.float(), expected) < (5e-2 if device == "cpu" else 0.1)


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12", "caformer_s18"])
def test_bfloat16_folded_blocks_follow_the_float32_blocks(name):
    """Block by block, where bf16 rounding stays near one ulp (<= 1.9e-2 measured on both machine kinds):
    a dropped norm or MLP bias moves a block's output by 0.16-0.3, and inputs whose variance is the norm's
    eps make a wrong eps (1e-5 for 1e-6 or back) move SepConv and attention blocks by 0.5-0.9 and the
    first pooling block by 0.15."""
    model = randomize(create_model(name, **SMALL)).eval()
    for stage in model.stages:
        block = stage.blocks[0]
        channels = block.norm1.weight.shape[0]
        for std in (1.0, block.norm1.eps**0.5):
            shape = (2, 16, channels) if stage.tokens else (2, channels, 8, 8)
            x = (std * torch.randn(shape) + 0.5 * std).bfloat16()
            with torch.no_grad():
                want = block(x.float())
                got = fast.fold_block(copy.deepcopy(block).bfloat16(), tokens=stage.tokens)(x)
            assert got.dtype == torch.bfloat16
            assert rel_diff(got.float(), want) < 3e-2, (type(block.token_mixer).__name__, std)


@pytest.mark.parametrize("mlp_route", ["gemm", "onednn", "conv", "native"])
@pytest.mark.parametrize("pool_route", ["torch", "native"])
@pytest.mark.parametrize("name", ["poolformer_s12", "caformer_s18"])
def test_every_fast_route_gives_the_plain_models_outputs(name, mlp_route, pool_route, monkeypatch):
    monkeypatch.setenv("METAFORMER_ROUTE_FAST_MLP", mlp_route)
    monkeypatch.setenv("METAFORMER_ROUTE_FAST_POOL_MIX", pool_route)
    model = randomize(create_model(name, **SMALL)).eval()
    x = torch.randn(3, 3, 64, 64)
    calls = []
    monkeypatch.setattr(fast, "bias_gelu_", lambda h, b, real=fast.bias_gelu_: calls.append(1) or real(h, b))
    with torch.no_grad():
        assert rel_diff(optimize_for_inference(model)(x), model(x)) <= 1e-5
    if mlp_route == "native" and name == "poolformer_s12" and kernels.native_available():
        assert calls  # the native bias + GELU pass really ran (CAFormer's StarReLU MLPs have no such route)
    if mlp_route != "native":
        assert not calls


def test_the_native_mlp_route_stays_out_of_autograd(monkeypatch):
    """The native pass works in place: with gradients wanted through the fast path (an inference copy,
    but a user may still ask, e.g. for saliency) it must not run, so autograd never sees a changed tensor."""
    monkeypatch.setenv("METAFORMER_ROUTE_FAST_MLP", "native")
    model = randomize(create_model("poolformer_s12", **SMALL)).eval()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    calls = []
    monkeypatch.setattr(fast, "bias_gelu_", lambda h, b, real=fast.bias_gelu_: calls.append(1) or real(h, b))
    out = optimize_for_inference(model)(x)
    torch.autograd.grad(out.sum(), x)  # no "modified by an inplace operation" error
    with torch.no_grad():
        assert not calls and rel_diff(out, model(x)) <= 1e-5


def test_a_onednn_primitive_this_cpu_lacks_falls_back_to_torch_ops(monkeypatch):
    """As bf16 inner products do on a CPU without AVX512-BF16: the same outputs, through F.linear."""
    monkeypatch.setenv("METAFORMER_ROUTE_FAST_MLP", "onednn")
    monkeypatch.setattr(fast, "_ONEDNN_FAILED", set())

    def unsupported(self, x, residual):
        raise RuntimeError(
            "could not create a primitive descriptor for the inner product forward propagation"
        )

    monkeypatch.setattr(fast.FusedLinear, "_onednn", unsupported)
    model = randomize(create_model("poolformer_s12", **SMALL)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(optimize_for_inference(model)(x), model(x)) <= 1e-5
    assert fast._ONEDNN_FAILED == {torch.float32}  # tried once, then never again for that dtype


def test_measured_fast_routes_never_keep_the_slower_candidate(monkeypatch, tmp_path):
    from metaformer.models import routes

    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    routes.reset()
    model = randomize(create_model("poolformer_s12", **SMALL)).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert rel_diff(optimize_for_inference(model)(x), model(x)) <= 1e-5
    made = [d for d in routes.decisions(include_cached=False) if d.route.startswith("fast_")]
    assert {d.route for d in made} >= {"fast_mlp", "fast_chunk"}
    for decision in made:
        assert decision.choice == min(decision.times_ms, key=decision.times_ms.get)
    routes.reset()

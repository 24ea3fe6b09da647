"""The compile backend: Inductor with freezing on our fast path, its caches under the metaformer home,
and when ``auto`` lets it join (by its estimated compile cost against the announced work)."""

import pytest
import torch

from metaformer import create_model, optimize_for_inference
from metaformer.compiling import compile_cache_summary
from metaformer.deploy import backends, build, building, choice, prepare_for_inference
from metaformer.deploy.backend_compile import COLD_COMPILE_S, COMPILE, WARM_COMPILE_S
from metaformer.deploy.backend_torch import TORCH
from metaformer.deploy.base import BF16_RTOL
from metaformer.deploy.choice import DeployRequest, with_compile
from metaformer.errors import ConfigError

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16], "num_classes": 10}
SIZE = (32, 32)


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("poolformer_s12", **TINY).eval()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One cold compile and one rebuild of the same key (fp32, batch 2) in a home of their own, and the
    compile seconds recorded after each: the module's only fp32 compile."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("METAFORMER_HOME", str(home))
        model = tiny()
        before = building.compile_cost_s(model, "fp32", SIZE, 2)
        first = build(model, "compile", "fp32", img_size=SIZE, batch_size=2)
        after_first = building.compile_cost_s(model, "fp32", SIZE, 2)
        second = build(tiny(), "compile", "fp32", img_size=SIZE, batch_size=2)
        after_second = building.compile_cost_s(model, "fp32", SIZE, 2)
    costs = (before, after_first, after_second)
    return {"model": model, "first": first, "second": second, "costs": costs, "home": home}


@pytest.mark.parametrize("batch", [2, 1, 5])  # the compiled size, and smaller / larger ones padded or split
def test_compiled_output_equals_the_eager_fast_path(compiled, batch):
    x = torch.randn(batch, 3, *SIZE)
    with torch.no_grad():
        want = optimize_for_inference(compiled["model"])(x)
    got = compiled["first"](x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1e-4
    got.add_(1)  # a plain tensor, not an inference-mode one the caller could not change


def test_the_weights_are_frozen_into_the_graph(compiled):
    """Frozen weights are constants of the compiled graph: changing the eager module's afterwards changes
    nothing, where an unfrozen graph (weights as inputs) would follow them."""
    runner = compiled["first"]
    x = torch.randn(2, 3, *SIZE)
    before = runner(x)
    weights = next(runner.model.module.parameters())
    saved = weights.detach().clone()
    with torch.no_grad():
        weights.mul_(3.0).add_(1.0)
    try:
        assert torch.equal(runner(x), before)
    finally:
        with torch.no_grad():
            weights.copy_(saved)


def test_a_second_build_of_the_same_key_is_a_cache_hit(compiled):
    first, second = compiled["first"].settings, compiled["second"].settings
    assert first["compiled"] and first["freezing"] and not first["warm"]
    assert second["warm"] and second["compile_s"] < first["compile_s"]  # the kernels were compiled
    assert compile_cache_summary(compiled["home"])["files"] > 0  # Inductor's cache: under the home
    # auto's estimate: the cold constant, then the warm one once compiled, then the warm compile measured
    before, after_first, after_second = compiled["costs"]
    assert before == (COLD_COMPILE_S, False) and after_first == (WARM_COMPILE_S, True)
    assert after_second == (pytest.approx(second["compile_s"], abs=1e-3), True)


def test_bf16_is_within_bf16s_precision(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    model = tiny()
    runner = build(model, "compile", "bf16", img_size=SIZE, batch_size=2)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        want = optimize_for_inference(model)(x)
    got = runner(x)
    assert runner.precision == "bf16" and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= BF16_RTOL * want.abs().max().item()
    assert runner.check["max_abs_diff"] <= runner.check["allowed"] < 1e-2  # bf16's check, not fp32's


def test_int8_is_one_sentence():
    with pytest.raises(
        ConfigError, match=r"^the compile backend runs fp32 and bf16, not int8; use --backend"
    ):
        COMPILE.check("int8")
    with pytest.raises(ConfigError, match="compile backend runs fp32 and bf16, not int8"):
        prepare_for_inference(
            tiny(), backend="compile", precision="int8", calibration=[torch.rand(4, 3, 32, 32)]
        )


# ------------------------------------------------------------------ auto: fake costs, nothing compiled
@pytest.fixture
def fake_costs(monkeypatch, tmp_path):
    """compile's estimate and the fast path's batch time, set by each test; a real compile fails it."""
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    costs = {"compile_s": COLD_COMPILE_S, "warm": False, "torch_batch_s": 1.0}
    monkeypatch.setattr(building, "compile_cost_s", lambda *a: (costs["compile_s"], costs["warm"]))
    monkeypatch.setattr(choice, "_torch_batch_s", lambda model, request: costs["torch_batch_s"])

    def no_compiling(*args, **kwargs):
        raise AssertionError("auto compiled")

    monkeypatch.setattr(COMPILE, "build", no_compiling)
    return costs


def joins(model, images: int | None, batch_size: int = 32) -> bool:
    request = DeployRequest(img_size=SIZE, batch_size=batch_size, images=images)
    return "compile" in with_compile(model, ["torch", "onnxruntime"], request)


def test_auto_takes_compile_only_when_the_announced_work_pays_for_it(fake_costs):
    model = tiny()
    fake_costs["compile_s"] = 60.0  # 60 s against batches of 1 s, of which compiling saves at most 30%
    assert joins(model, images=32 * 201) and not joins(model, images=32 * 199)
    assert not joins(model, images=None)  # unknown work: a cold compile never joins
    fake_costs.update(compile_s=2.0, warm=True)
    assert joins(model, images=None)  # ... a warm one does
    fake_costs["torch_batch_s"] = 10.0
    assert not joins(model, images=32 * 4)  # a few batches: not worth any compile, even one this cheap
    assert "compile" not in with_compile(model, ["onnxruntime"], DeployRequest(images=10**6))  # no fast path
    every_size = DeployRequest(img_size=SIZE, batch_size=32, images=10**6, dynamic_size=True)
    assert "compile" not in with_compile(model, ["torch"], every_size)  # a new size would compile again


def test_auto_measures_compile_beside_the_others_when_it_pays(fake_costs, monkeypatch):
    """Compile joined: auto builds and times it with the others (a stand-in here: no compile)."""
    built = []

    def stand_in(model, precision, example, *, key, threads=None, **kwargs):
        built.append(key)
        runner = TORCH.build(model, precision, example, threads=threads)
        runner.settings.update(compile_s=0.5, compiled=True, cache_hit=False)
        return runner

    monkeypatch.setattr(COMPILE, "build", stand_in)
    monkeypatch.setattr(backends, "candidates", lambda precision: ["torch"])
    fake_costs.update(compile_s=1.0, torch_batch_s=1.0)
    _, name = prepare_for_inference(tiny(), img_size=SIZE, batch_size=2, images=2 * 50)
    assert built == [building.compile_key(tiny(), "fp32", SIZE, 2)] and name in ("torch", "compile")
    fake_costs["compile_s"] = COLD_COMPILE_S  # the same work cannot pay a cold compile: torch alone
    built.clear()
    _, name = prepare_for_inference(tiny(1), img_size=SIZE, batch_size=2, images=2 * 50)
    assert built == [] and name == "torch"

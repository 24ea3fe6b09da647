"""compiling.py: torch.compile with its caches under the metaformer home, and eager when it fails."""

import pytest
import torch
from torch import nn

from metaformer import compiling


@pytest.fixture
def home(monkeypatch, tmp_path):
    """A metaformer home in tmp_path; the cache variables are restored after the test."""
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "unset-by-test")
    torch._dynamo.reset()
    yield tmp_path
    torch._dynamo.reset()


def test_caches_go_under_the_metaformer_home(home):
    folder = compiling.enable_compile_caches()
    assert folder == home / "inductor" == compiling.inductor_cache_dir()
    assert compiling.enable_compile_caches() == folder  # idempotent
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")


def test_a_second_build_loads_the_saved_artefacts_and_the_summary_counts_them(home):
    """One real (Inductor) compile of a one-layer model: the artefacts it saves are what the second
    build loads; the second first call runs from cache, far faster than the cold one."""
    first = compiling.compile_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), key="lin4")
    assert not first.cache_hit
    with torch.no_grad():
        first(torch.randn(2, 4))
    assert first.compiled and first.compile_seconds > 0
    assert (home / "inductor" / "artifacts" / "lin4.bin").is_file()
    torch._dynamo.reset()
    second = compiling.compile_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), key="lin4")
    assert second.cache_hit
    with torch.no_grad():
        second(torch.randn(2, 4))
    assert second.compiled and second.compile_seconds < first.compile_seconds
    summary = compiling.compile_cache_summary()
    assert summary["path"] == str(home / "inductor") and summary["files"] > 0 and summary["bytes"] > 0


def test_the_wrapper_shares_the_eager_parameters_and_keys(home):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    wrapped = compiling.compile_module(model, key="conv", backend="aot_eager")
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert not any("_orig_mod" in k for k in wrapped.state_dict())
    assert [p.data_ptr() for p in wrapped.parameters()] == [p.data_ptr() for p in model.parameters()]
    assert compiling.unwrap_compiled(wrapped) is model


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C compiler here")


def test_a_failing_compile_warns_once_and_runs_eager(home, warned):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    wrapped = compiling.compile_module(model, key="fails", backend=_failing_backend)
    x = torch.randn(2, 4)
    torch.testing.assert_close(wrapped(x), model(x))
    wrapped(x)
    assert not wrapped.compiled and "no C compiler here" in wrapped.failure
    assert len(warned()) == 1 and "--compile off" in warned()[0] and "no C compiler here" in warned()[0]


def test_torch_compile_raising_at_build_falls_back_too(home, warned, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", refuse)
    model = nn.Linear(4, 2)
    wrapped = compiling.compile_module(model, key="refused")
    x = torch.randn(3, 4)
    torch.testing.assert_close(wrapped(x), model(x))
    assert not wrapped.compiled and len(warned()) == 1 and "Dynamo is not supported" in warned()[0]


def test_a_recompile_that_fails_later_falls_back_too(home, warned):
    """A new input shape recompiles after the first calls; that compile failing is the compiler's error."""
    graphs = []

    def once(gm, example_inputs):
        graphs.append(gm)
        if len(graphs) > 1:
            raise RuntimeError("the second graph does not build")
        return gm.forward

    model = nn.Linear(4, 2)
    wrapped = compiling.compile_module(model, key="recompile", backend=once)  # dynamic=False: a new shape
    for _ in range(3):
        wrapped(torch.randn(3, 4))
    assert wrapped.compiled and not warned()
    x = torch.randn(5, 4)
    torch.testing.assert_close(wrapped(x), model(x))
    assert not wrapped.compiled and len(warned()) == 1 and "second graph" in warned()[0]

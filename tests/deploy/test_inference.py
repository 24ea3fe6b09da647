"""``prepare_for_inference(backend="auto")``'s fallbacks: a runtime that is not installed, an export whose
outputs fail their check, and a machine where PyTorch was measured faster before (nothing is exported
again). Each ends on the PyTorch fast path, which must still give the model's outputs."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

from metaformer import create_model
from metaformer.deploy import prepare_for_inference
from metaformer.errors import ExportError
from metaformer.models import routes

SIZE = (32, 32)


@pytest.fixture(autouse=True)
def _measured_routes(monkeypatch, tmp_path):
    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)  # auto measures the backends for real...
    for route, choices in routes.ROUTES.items():  # ... but the fast path's own routes take their default
        if route != "backend":
            monkeypatch.setenv(f"METAFORMER_ROUTE_{route.upper()}", choices[0])
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    routes.reset()
    yield
    routes.reset()


@pytest.fixture
def model() -> nn.Module:
    model = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # layer scales far from 1e-5: every branch counts
    return model


class _Builds(list):
    """The backends built, in order, and what a runtime's build does instead (``runtime(name, fn)``)."""

    def __init__(self):
        super().__init__()
        self.behaviour: dict[str, object] = {}

    def runtime(self, name: str, action) -> None:
        self.behaviour[name] = action


@pytest.fixture
def builds(monkeypatch):
    """Every backend ``auto`` builds, in order; ``builds.runtime(name)`` sets what a runtime build does."""
    from metaformer.deploy import building

    real = building.build
    made = _Builds()
    behaviour = made.behaviour

    def build(model, backend, *args, **kwargs):
        made.append(backend)
        action = behaviour.get(backend)
        if callable(action):
            return action(model)
        return real(model, backend, *args, **kwargs)

    monkeypatch.setattr(building, "build", build)
    return made


def _same_outputs(runner: nn.Module, model: nn.Module) -> None:
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=1e-5, atol=1e-5)


def test_without_any_runtime_auto_is_the_fast_path_and_exports_nothing(model, builds, monkeypatch):
    from metaformer.deploy import runtimes

    monkeypatch.setattr(runtimes, "available", lambda runtime: False)
    runner, backend = prepare_for_inference(model, backend="auto", img_size=SIZE, batch_size=2)
    assert backend == "torch" and builds == ["torch"]
    _same_outputs(runner, model)


def test_a_runtime_whose_export_fails_its_check_is_skipped_with_a_warning(model, builds, caplog):
    def fails(model):
        raise ExportError("outputs differ from PyTorch by 3e-2 (max abs); not written")

    builds.runtime("onnxruntime", fails)
    builds.runtime("openvino", fails)
    with caplog.at_level(logging.WARNING):
        runner, backend = prepare_for_inference(model, backend="auto", img_size=SIZE, batch_size=2)
    assert backend == "torch"
    assert {"onnxruntime", "openvino"} & set(builds)  # tried, where installed
    assert "backend skipped: outputs differ" in caplog.text
    _same_outputs(runner, model)


class _Slow(nn.Module):
    """A runtime stand-in 20 ms slower per batch than anything else."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return self.model(x)


def test_a_cached_torch_choice_exports_nothing_in_the_next_process(model, builds):
    builds.runtime("onnxruntime", _Slow)
    builds.runtime("openvino", _Slow)
    _, backend = prepare_for_inference(model, backend="auto", img_size=SIZE, batch_size=2)
    assert backend == "torch"
    [decision] = [d for d in routes.decisions() if d.route == "backend"]
    assert decision.choice == "torch" and len(decision.times_ms) >= 2  # measured against a runtime

    routes.reset()  # the next process: the choice comes from the cache file
    builds.clear()

    def must_not_build(model):
        raise AssertionError("a runtime was built although torch is known to win here")

    builds.runtime("onnxruntime", must_not_build)
    builds.runtime("openvino", must_not_build)
    runner, backend = prepare_for_inference(model, backend="auto", img_size=SIZE, batch_size=2)
    assert backend == "torch" and builds == ["torch"]
    _same_outputs(runner, model)

"""prepare_for_inference: auto measures every backend that runs the precision, and weighs a backend's
one-off cost against the time it saves over the announced work."""

import pytest
import torch

from metaformer import create_model
from metaformer.deploy import cache, prepare_for_inference
from metaformer.errors import ConfigError
from metaformer.models import routes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "num_classes": 10}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))
    routes.reset()
    yield
    routes.reset()


def model() -> torch.nn.Module:
    return create_model("poolformer_s12", **TINY).eval()


def entries() -> list:
    root = cache.cache_root()
    return [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []


def test_auto_measures_every_backend_of_the_precision(monkeypatch):
    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)
    runner, name = prepare_for_inference(model(), img_size=(32, 32), batch_size=4)
    [decision] = [d for d in routes.decisions() if d.route == "backend"]
    assert set(decision.times_ms) == {"torch", "onnxruntime", "openvino"}
    assert name == decision.choice == runner.backend


def test_a_short_run_takes_the_backend_that_needs_no_build(monkeypatch):
    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)
    runner, name = prepare_for_inference(model(), img_size=(32, 32), batch_size=1, images=1)
    assert name == "torch" and entries() == []  # nothing exported to be measured for one image
    assert [d for d in routes.decisions() if d.route == "backend"] == []


def test_one_batch_runs_the_model_unfolded():
    net = model()
    runner, name = prepare_for_inference(net, backend="torch", img_size=(32, 32), batch_size=4, images=3)
    assert name == "torch" and runner.settings["folded"] is False and runner.model is net
    folded, _ = prepare_for_inference(net, backend="torch", img_size=(32, 32), batch_size=4, images=5)
    assert "folded" not in folded.settings and folded.model is not net
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (runner(x) - folded(x)).abs().max() <= 1e-4


def test_a_measured_choice_is_weighed_against_its_one_off_cost(monkeypatch):
    times = {"torch": 10.0, "onnxruntime": 5.0, "openvino": 6.0}
    decision = routes.Decision("backend", "x", "onnxruntime", times)
    monkeypatch.setattr(routes, "known_decision", lambda *args: decision)
    net = model()
    # one image: a 5 ms saving does not pay for an export (nothing cached yet)
    assert prepare_for_inference(net, img_size=(32, 32), batch_size=1, images=1)[1] == "torch"
    assert entries() == []
    # unbounded work (the library default): the measured choice, built and cached
    assert prepare_for_inference(net, img_size=(32, 32), batch_size=1)[1] == "onnxruntime"
    assert len(entries()) == 1
    # once it is cached, loading it costs little: 5,000 images repay it
    assert prepare_for_inference(net, img_size=(32, 32), batch_size=1, images=5000)[1] == "onnxruntime"
    assert len(entries()) == 1


def test_int8_auto_needs_calibration_and_amp_excludes_precision():
    with pytest.raises(ConfigError, match="int8 needs calibration images"):
        prepare_for_inference(model(), precision="int8", img_size=(32, 32))
    with pytest.raises(ConfigError, match="pass either --amp or --precision bf16"):
        prepare_for_inference(model(), precision="bf16", amp=torch.bfloat16)
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, int8, got 'fp8'"):
        prepare_for_inference(model(), precision="fp8")

"""deploy.agreement through ``prepare_for_inference``: auto keeps only the int8 candidates that agree with
fp32 on the held-out images at or above the threshold and takes the fastest of them; a named backend
below it runs after one warning sentence; when none passes, one sentence names each one's agreement.

The candidates are stand-in backends with one interface (a good one that is slow, a broken one that is
fast), so what is tested is the rule, the same on every CPU."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from metaformer import create_model
from metaformer.deploy import backends, cache, choice, prepare_for_inference
from metaformer.deploy.base import Runner, check_int8
from metaformer.errors import ConfigError, ExportError

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "num_classes": 4}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))


class Stand(Runner):
    """The fp32 model's logits, class order reversed (``broken``: every image changes class), and
    ``delay_s`` per call."""

    def __init__(self, name, model, broken, delay_s):
        super().__init__(name, "int8")
        self.model, self.broken, self.delay_s, self.calls = model, broken, delay_s, 0

    def forward(self, x):
        self.calls += 1
        time.sleep(self.delay_s)
        out = self.model(x)
        return out.flip(1) if self.broken else out


def stand_in(name, broken, delay_s, built):
    def build(model, precision, example, **kwargs):
        runner = Stand(name, model, broken, delay_s)
        runner.check = check_int8(runner, model, kwargs["calibration"])
        built[name] = runner
        return runner

    return SimpleNamespace(
        name=name,
        precisions=("int8",),
        caches_files=False,
        compiles=False,
        check=lambda precision: None,
        build=build,
    )


@pytest.fixture
def stands(monkeypatch):
    """Two int8 candidates: "good" (exact, 20 ms a call) and "bad" (every class flipped, instant)."""
    built: dict[str, Stand] = {}
    modules = {
        "good": stand_in("good", False, 0.02, built),
        "bad": stand_in("bad", True, 0.0, built),
    }
    monkeypatch.setattr(backends, "backend", lambda name: modules[name])
    monkeypatch.setattr(backends, "candidates", lambda precision: ["bad", "good"])
    monkeypatch.setattr(choice, "BACKENDS", ("auto", "bad", "good"))
    built["modules"] = modules  # a test may break "good" too
    return built


def model_and_images():
    torch.manual_seed(0)
    model = create_model("poolformer_s12", **TINY).eval()
    return model, [torch.rand(16, 3, 32, 32)]


def test_auto_drops_the_fast_candidate_below_the_threshold_and_records_why(stands):
    model, images = model_and_images()
    runner, name = prepare_for_inference(model, precision="int8", img_size=(32, 32), calibration=images)
    assert name == "good" and runner is stands["good"]
    assert runner.choice["dropped"] == {"bad": "agrees with fp32 on 0.0% of 8 held-out images, below 99%"}
    assert runner.choice["min_agreement"] == 0.99 and runner.choice["chosen"] == "good"
    recorded = json.loads((cache.cache_root() / "choices.json").read_text())
    assert [entry["dropped"] for entry in recorded.values()] == [runner.choice["dropped"]]


def test_auto_takes_the_fastest_when_the_threshold_is_zero(stands):
    model, images = model_and_images()
    _, name = prepare_for_inference(
        model, precision="int8", img_size=(32, 32), calibration=images, min_agreement=0.0
    )
    assert name == "bad"


def test_a_named_backend_below_the_threshold_runs_after_one_warning(stands, warned):
    model, images = model_and_images()
    runner, name = prepare_for_inference(
        model, backend="bad", precision="int8", img_size=(32, 32), calibration=images
    )
    assert name == "bad" and runner is stands["bad"]
    assert len(warned()) == 1 and "bad int8 agrees with fp32 on 0.0% of 8 held-out images" in warned()[0]
    prepare_for_inference(model, backend="good", precision="int8", img_size=(32, 32), calibration=images)
    assert len(warned()) == 1  # the good one adds none


def test_no_candidate_passing_is_one_sentence_naming_each_agreement(stands):
    model, images = model_and_images()
    stands["modules"]["good"] = stand_in("good", True, 0.0, stands)
    with pytest.raises(ExportError) as error:
        prepare_for_inference(model, precision="int8", img_size=(32, 32), calibration=images)
    message = str(error.value)
    assert "no int8 backend agrees with fp32 on at least 99% of the held-out images" in message
    assert "bad 0.0% of 8 held-out images, good 0.0% of 8 held-out images" in message
    assert "--min-agreement" in message and "\n" not in message
    recorded = json.loads((cache.cache_root() / "choices.json").read_text())
    assert [entry["chosen"] for entry in recorded.values()] == [None]


def test_min_agreement_is_a_fraction(stands):
    model, images = model_and_images()
    with pytest.raises(ConfigError, match="fraction from 0 to 1"):
        prepare_for_inference(
            model, precision="int8", img_size=(32, 32), calibration=images, min_agreement=99
        )

"""``threads=`` reaches the runtimes: a runner built with N threads while PyTorch runs another count
runs and reports N, whether its artefact is built or loaded from the cache. The commands set PyTorch's
count first, so only a library caller sees the difference."""

import pytest
import torch

from metaformer import create_model
from metaformer.deploy import prepare_for_inference

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "num_classes": 10}
ASKED = 1  # fewer than PyTorch's count below; OpenVINO caps the count at the cores, and 1 fits every machine


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))


@pytest.fixture
def torch_on_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def uses_threads(runner) -> int:
    """The thread count the runtime itself was given, read back from it."""
    if runner.backend == "openvino":
        return int(runner.compiled.get_property("INFERENCE_NUM_THREADS"))
    return runner.session.get_session_options().intra_op_num_threads


@pytest.mark.usefixtures("torch_on_two_threads")
@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_runner_runs_and_reports_the_threads_asked_for(backend):
    model = create_model("poolformer_s12", **TINY).eval()
    for attempt in ("built", "cached"):
        runner, _ = prepare_for_inference(model, backend=backend, img_size=(32, 32), threads=ASKED)
        assert torch.get_num_threads() == 2  # PyTorch's own count is left alone
        assert uses_threads(runner) == ASKED, attempt
        assert runner.settings["threads"] in (ASKED, str(ASKED)), attempt
        assert f"{ASKED} threads" in runner.describe()

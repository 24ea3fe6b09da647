"""The deployment cache: artefacts reused by the weights' hash, rebuilt when anything in the key changes."""

import pytest
import torch

from metaformer import create_model
from metaformer.deploy import build, cache, onnx_export
from metaformer.deploy.quantize import Calibration

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "num_classes": 10}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))


def exports(monkeypatch) -> list:
    calls = []
    real = onnx_export.export_model

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    for module in ("backend_onnxruntime", "backend_openvino"):
        monkeypatch.setattr(f"metaformer.deploy.{module}.export_model", counting)
    return calls


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_built_artefact_is_reused_by_the_weights_hash(monkeypatch, backend):
    calls = exports(monkeypatch)
    torch.manual_seed(1)
    model = create_model("poolformer_s12", **TINY).eval()
    torch.manual_seed(1)
    same = create_model("poolformer_s12", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    first = build(model, backend, "fp32", img_size=(32, 32))
    again = build(same, backend, "fp32", img_size=(32, 32))
    assert len(calls) == 1  # the same weights: loaded, not exported again
    assert torch.equal(first(x), again(x)) and again.check == first.check
    [entry] = [p for p in cache.cache_root().iterdir() if p.is_dir()]
    assert (entry / "meta.json").is_file()
    with torch.no_grad():
        model.head.fc.bias.add_(1.0)
    build(model, backend, "fp32", img_size=(32, 32))  # other weights: another entry
    build(model, backend, "fp32", img_size=(64, 64))  # another input size: another entry
    assert len(calls) == 3
    assert cache.costs(backend, "fp32", "poolformer_s12-32x32").keys() == {"build_s", "load_s"}


def test_an_artefact_from_an_older_export_format_is_not_reused(monkeypatch):
    calls = exports(monkeypatch)
    model = create_model("poolformer_s12", **TINY).eval()
    build(model, "onnxruntime", "fp32", img_size=(32, 32))
    monkeypatch.setattr(onnx_export, "EXPORT_VERSION", onnx_export.EXPORT_VERSION + 1)
    build(model, "onnxruntime", "fp32", img_size=(32, 32))  # newer export code: exported again
    build(model, "onnxruntime", "fp32", img_size=(32, 32))
    assert len(calls) == 2


def test_int8_is_keyed_by_its_calibration_set(monkeypatch):
    calls = exports(monkeypatch)
    model = create_model("poolformer_s12", **TINY).eval()
    images = torch.randn(8, 3, 32, 32)
    build(model, "onnxruntime", "int8", img_size=(32, 32), calibration=Calibration([images], key="set-a"))
    build(model, "onnxruntime", "int8", img_size=(32, 32), calibration=Calibration([images], key="set-a"))
    assert len(calls) == 1
    unread = Calibration(iter(()), key="set-a")  # a cached int8 model never reads its calibration images
    build(model, "onnxruntime", "int8", img_size=(32, 32), calibration=unread)
    assert len(calls) == 1
    build(model, "onnxruntime", "int8", img_size=(32, 32), calibration=Calibration([images], key="set-b"))
    build(model, "onnxruntime", "int8", img_size=(32, 32), calibration=[images + 1])  # keyed by content
    assert len(calls) == 3


def test_weights_digest_reads_channels_last_and_bf16_weights():
    model = create_model("poolformer_s12", **TINY).eval()
    digest = cache.weights_digest(model)
    assert cache.weights_digest(model.to(memory_format=torch.channels_last)) == digest
    assert cache.weights_digest(model.to(torch.bfloat16)) != digest


def test_an_unwritable_cache_only_costs_a_rebuild(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("METAFORMER_HOME", str(blocker))
    calls = exports(monkeypatch)
    model = create_model("poolformer_s12", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (build(model, "onnxruntime", "fp32", img_size=(32, 32))(x) - model(x)).abs().max() <= 1e-4
    build(model, "onnxruntime", "fp32", img_size=(32, 32))
    assert len(calls) == 2

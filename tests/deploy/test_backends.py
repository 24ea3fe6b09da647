"""Every backend at every precision it runs, against PyTorch: fp32 to 1e-4, bf16 to bf16's precision,
int8 by top-1 agreement with fp32 (on held-out calibration images) on a model trained here to >= 90%
held-out top-1 on the digits."""

import numpy as np
import pytest
import torch

from metaformer import create_model
from metaformer.data.embedded import digits_splits
from metaformer.deploy import backend_openvino, build
from metaformer.deploy.quantize import Calibration, float_ops
from metaformer.deploy.runtimes import openvino_native_bf16
from metaformer.errors import ConfigError, DataError, ExportError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "num_classes": 10}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))


def randomized() -> torch.nn.Module:
    model = create_model("poolformer_s12", **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # layer scales away from 1e-5, so every branch counts
    return model


@pytest.fixture(scope="module")
def digits():
    """A small PoolFormer trained on the embedded digits (32x32) to >= 90% held-out top-1, and its data."""
    torch.manual_seed(0)
    train, val = digits_splits(32)

    def tensors(split):
        x = torch.from_numpy(np.stack(split.images)).float().div(255).permute(0, 3, 1, 2)
        return (x - 0.5) / 0.25, torch.tensor(split.targets)

    (x, y), (xv, yv) = tensors(train), tensors(val)
    model = create_model("poolformer_s12", num_classes=10, depths=[1, 1, 1, 1], dims=[16, 32, 64, 128])
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.01)
    for _ in range(4):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        top1 = (model(xv).argmax(1) == yv).float().mean().item()
    assert top1 >= 0.9, f"the test model reached only {top1:.1%} held-out top-1"
    return model, x, xv, yv


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_fp32_matches_pytorch_to_1e_4(backend):
    model = randomized()
    runner = build(model, backend, "fp32", img_size=(32, 32), batch_size=4)
    x = torch.randn(5, 3, 32, 32)  # a batch size the check never saw
    with torch.no_grad():
        assert (runner(x) - model(x)).abs().max().item() <= 1e-4
    assert runner.backend == backend and runner.precision == "fp32"
    if backend == "openvino":
        # fp32 sets OpenVINO's f32 hint explicitly (its default is bf16 on a CPU with native bf16)
        assert runner.settings == {"hint": "f32", "threads": "1", "performance_hint": "LATENCY"}
        assert runner.describe() == "openvino fp32 (hint f32, 1 threads, LATENCY)"
    if backend != "torch":
        assert runner.check["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_bf16_runs_in_bf16_within_its_precision(backend):
    if backend == "openvino" and not openvino_native_bf16():
        pytest.skip("OpenVINO runs bf16 only on a CPU with native bf16")
    model = randomized()
    runner = build(model, backend, "bf16", img_size=(32, 32), batch_size=4)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        diff = (runner(x) - want).abs().max().item()
    assert runner(x).dtype == torch.float32
    assert diff <= 2**-4 * want.abs().max().item()  # a dozen bf16 roundings (8 significant bits)
    assert diff > 1e-5  # it did not run in fp32 under a bf16 label


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_int8_records_its_agreement_on_the_held_out_digits(digits, backend):
    """What the check records is the agreement on the held-out quarter of the calibration images, which
    the quantizer never saw (the figure itself depends on the CPU's int8 kernels: not asserted)."""
    model, x_train, _, _ = digits
    calibration = Calibration([x_train[i : i + 50] for i in range(0, 300, 50)], key=None)
    runner = build(model, backend, "int8", img_size=(32, 32), batch_size=32, calibration=calibration)
    held_out = torch.from_numpy(np.concatenate(calibration.held_out_images()))
    with torch.no_grad():
        agreement = (runner(held_out).argmax(1) == model(held_out).argmax(1)).float().mean().item()
    assert runner.check["images"] == 100 and runner.check["calibrated_on"] == 200
    assert runner.check["unit"] == "image" and runner.check["agreement"] == pytest.approx(agreement)


def test_a_quantization_with_absurd_scales_is_dropped_by_auto_and_warned_when_named(
    digits, monkeypatch, warned
):
    """onnxruntime's QDQ file with every scale multiplied by 1000: the real runtime then runs nonsense on
    every CPU. auto (onnxruntime its only candidate here) refuses it in one sentence; named, it runs
    after one warning sentence giving its agreement."""
    import onnx
    from onnx import numpy_helper

    from metaformer.deploy import backend_onnxruntime, backends, prepare_for_inference

    real = backend_onnxruntime.quantize_qdq

    def absurd(onnx_path, out_path, calibration, setting="u8s8"):
        real(onnx_path, out_path, calibration, setting)
        graph = onnx.load(str(out_path))
        for init in graph.graph.initializer:
            if init.name.endswith("_scale"):
                init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1000, init.name))
        onnx.save(graph, str(out_path))

    monkeypatch.setattr(backend_onnxruntime, "quantize_qdq", absurd)
    monkeypatch.setattr(backends, "candidates", lambda precision: ["onnxruntime"])
    model, x_train, _, _ = digits
    calibration = Calibration([x_train[:200]])
    with pytest.raises(
        ExportError, match=r"no int8 backend agrees .* \(onnxruntime \d+\.\d% of 100 held-out"
    ):
        prepare_for_inference(model, precision="int8", img_size=(32, 32), calibration=calibration)
    runner, name = prepare_for_inference(
        model, backend="onnxruntime", precision="int8", img_size=(32, 32), calibration=calibration
    )
    assert name == "onnxruntime" and runner.check["agreement"] < 0.5
    assert len(warned()) == 1 and "onnxruntime int8 agrees with fp32 on" in warned()[0]


def test_onnxruntime_keeps_the_most_faithful_qdq_setting_measured_here(digits, monkeypatch):
    """Every setting onnxruntime's guide offers is quantized and measured (held-out agreement, time); with
    the default U8S8 file broken by absurd scales, another one is kept, and the check says which."""
    import onnx
    from onnx import numpy_helper

    from metaformer.deploy import backend_onnxruntime
    from metaformer.deploy.quantize import QDQ_SETTINGS

    real = backend_onnxruntime.quantize_qdq

    def default_broken(onnx_path, out_path, calibration, setting="u8s8"):
        real(onnx_path, out_path, calibration, setting)
        if setting == "u8s8":
            graph = onnx.load(str(out_path))
            for init in graph.graph.initializer:
                if init.name.endswith("_scale"):
                    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1000, init.name))
            onnx.save(graph, str(out_path))

    monkeypatch.setattr(backend_onnxruntime, "quantize_qdq", default_broken)
    model, x_train, _, _ = digits
    runner = build(model, "onnxruntime", "int8", img_size=(32, 32), calibration=Calibration([x_train[:200]]))
    tried = runner.check["settings"]
    assert set(tried) == set(QDQ_SETTINGS) and all(check["ms_per_batch"] > 0 for check in tried.values())
    kept = runner.check["quantization"]
    assert kept != "u8s8" and runner.check["agreement"] == max(check["agreement"] for check in tried.values())
    assert tried["u8s8"]["agreement"] < 0.5
    from metaformer.deploy.cache import cache_root

    assert [p.name for p in cache_root().rglob("*.onnx")] == ["model.int8.onnx"]  # the others removed


def test_int8_quantizes_the_matmuls_and_keeps_the_norm_statistics_in_float(digits, tmp_path):
    from metaformer.deploy.onnx_export import export_model
    from metaformer.deploy.quantize import quantize_openvino

    model, x_train, _, _ = digits
    export_model(model, tmp_path / "m.onnx", img_size=(32, 32), dynamic_batch=True)
    ops = float_ops(quantize_openvino(tmp_path / "m.onnx", Calibration([x_train[:64]])))
    assert ops["int8"].get("Convolution", 0) >= 9  # stem, 3 downsamplings, fc1 and fc2 of 4 blocks... as 1x1
    assert {"MVN", "Gelu"} <= set(ops["float"]) and not {"MVN", "Gelu"} & set(ops["int8"])
    # each block's two norms stay one fused MVN: FakeQuantize nodes inside the mean/variance chain (NNCF on
    # the unconverted graph) split it into element-wise ops and made the int8 model slower than timm's
    blocks = sum(type(m).__name__ == "MetaFormerBlock" for m in model.modules())
    assert blocks and ops["float"]["MVN"] >= 2 * blocks and "Sqrt" not in ops["float"]


def test_precisions_a_backend_cannot_run_are_one_sentence(monkeypatch):
    model = randomized()
    with pytest.raises(ConfigError, match="onnxruntime backend runs fp32 and int8, not bf16"):
        build(model, "onnxruntime", "bf16", img_size=(32, 32))
    with pytest.raises(ConfigError, match="torch backend runs fp32 and bf16, not int8"):
        build(model, "torch", "int8", img_size=(32, 32))
    with pytest.raises(ConfigError, match="int8 needs calibration images"):
        build(model, "openvino", "int8", img_size=(32, 32))
    with pytest.raises(DataError, match="calibration set holds no images"):
        build(model, "openvino", "int8", img_size=(32, 32), calibration=[])
    monkeypatch.setattr(backend_openvino, "openvino_native_bf16", lambda: False)
    with pytest.raises(ConfigError, match="OpenVINO runs bf16 only on a CPU with native bf16"):
        build(model, "openvino", "bf16", img_size=(32, 32))


def test_an_isa_cap_below_bf16_means_no_native_bf16(monkeypatch):
    """OpenVINO's oneDNN obeys ONEDNN_MAX_CPU_ISA although its capability list reads cpuid: under an
    AVX2 cap a bf16 graph fails to compile, so bf16 must not be offered there."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not openvino_native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not openvino_native_bf16()


def test_a_model_openvino_cannot_compile_is_one_sentence(monkeypatch):
    from metaformer.deploy import runtimes

    class Core:
        def compile_model(self, *args, **kwargs):
            raise RuntimeError("Exception from plugin.cpp:54:\nSupported primitive descriptors list is empty")

    monkeypatch.setattr(runtimes, "openvino_core", lambda: Core())
    expected = r"^OpenVINO could not compile the model at bf16 on this CPU"
    with pytest.raises(ExportError, match=expected) as info:
        runtimes.openvino_compile("model.xml", "bf16", threads=1)
    assert "\n" not in str(info.value) and "primitive descriptors list is empty" in str(info.value)

"""An int8 artefact holds int8 arithmetic, wherever it is built or loaded from.

Agreement with fp32 cannot tell: the fp32 graph under an int8 label agrees perfectly. So these tests
read the graphs themselves. OpenVINO: the model handed to ``compile_model`` feeds every convolution and
matmul from a FakeQuantize node (on every CPU), and where the CPU plugin has int8 kernels (its
``OPTIMIZATION_CAPABILITIES`` list INT8: every x86 CPU from AVX2 on, with or without VNNI or AMX)
the compiled model's runtime graph executes each of them in u8/i8. onnxruntime: the QDQ file the
session opens feeds every Conv/MatMul/Gemm from a DequantizeLinear node (or holds QLinear/Integer ops).
"""

from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch

from metaformer import create_model
from metaformer.deploy import backend_onnxruntime, backend_openvino, build, export_deployable
from metaformer.deploy.quantize import Calibration, float_ops
from metaformer.deploy.runtimes import openvino_core
from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "num_classes": 10}
SIZE = (32, 32)
MATMULS = {"Conv", "Convolution", "MatMul", "Gemm"}  # ONNX and OpenVINO names
QUANTIZED_ONNX_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
RUNTIME_MATMULS = {"Convolution", "FullyConnected", "MatMul", "Deconvolution"}  # CPU plugin layer types


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))


@pytest.fixture
def handed(monkeypatch) -> dict[str, list]:
    """What each runtime is handed to run: OpenVINO's ``ov.Model``s and onnxruntime's ONNX graphs."""
    seen: dict[str, list] = {"openvino": [], "onnxruntime": []}
    real_compile = backend_openvino.openvino_compile
    real_session = backend_onnxruntime.onnxruntime_session

    def compile_spy(model, precision, threads=None):
        seen["openvino"].append(model)
        return real_compile(model, precision, threads)

    def session_spy(path, threads=None):
        seen["onnxruntime"].append(onnx.load(str(path)))  # read now: a built folder is renamed after
        return real_session(path, threads)

    monkeypatch.setattr(backend_openvino, "openvino_compile", compile_spy)
    monkeypatch.setattr(backend_onnxruntime, "onnxruntime_session", session_spy)
    return seen


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("poolformer_s12", **TINY).eval()


def segmenter() -> torch.nn.Module:
    torch.manual_seed(0)
    overrides = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
    return create_segmenter(
        SegmenterConfig(4, backbone_overrides=overrides, fpn_channels=16, head_channels=16, dropout=0.0)
    ).eval()


def calibration() -> Calibration:
    return Calibration([torch.randn(8, 3, *SIZE, generator=torch.Generator().manual_seed(1))])


def assert_quantized_graph(model) -> None:
    """Every convolution and matmul of an OpenVINO or ONNX model reads quantized values."""
    ops = float_ops(model)
    in_float = {op: n for op, n in ops["float"].items() if op in MATMULS}
    quantized = sum(n for op, n in ops["int8"].items() if op in MATMULS)
    if not hasattr(model, "get_ordered_ops"):  # ONNX: QOperator ops count as quantized too
        quantized += sum(node.op_type in QUANTIZED_ONNX_OPS for node in model.graph.node)
    assert quantized > 0 and not in_float, f"int8: {ops['int8']}, float: {ops['float']}"


def openvino_has_int8() -> bool:
    return "INT8" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def assert_runs_int8(runner, handed: dict[str, list]) -> None:
    """The runner's backend was handed a quantized graph and (OpenVINO, where it has int8 kernels) its
    compiled model runs every convolution and matmul in u8/i8."""
    assert runner.precision == "int8"
    assert handed[runner.backend], f"{runner.backend} was handed no model"
    assert_quantized_graph(handed[runner.backend][-1])
    if runner.backend != "openvino" or not openvino_has_int8():
        return
    layers = Counter()
    for op in runner.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in RUNTIME_MATMULS:
            layers[(layer, info["runtimePrecision"].astype(str))] += 1
    assert layers and all(precision in ("u8", "i8") for _, precision in layers), dict(layers)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_an_int8_build_and_its_cached_copy_run_int8(backend, handed):
    model = classifier()
    built = build(model, backend, "int8", img_size=SIZE, calibration=calibration())
    assert_runs_int8(built, handed)
    handed[backend].clear()
    cached = build(model, backend, "int8", img_size=SIZE, calibration=calibration())
    assert len(handed[backend]) == 1 and cached.check == built.check  # loaded from the cache, not rebuilt
    assert_runs_int8(cached, handed)


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_a_segmenter_int8_graph_for_every_size_runs_int8(backend, handed):
    from metaformer.deploy import prepare_for_inference

    runner, name = prepare_for_inference(
        segmenter(), backend=backend, precision="int8", img_size=SIZE, batch_size=1,
        calibration=calibration(), dynamic_size=True,
    )  # fmt: skip
    assert name == backend
    assert_runs_int8(runner, handed)


@pytest.mark.parametrize("format", ["openvino", "onnx"])
def test_an_exported_int8_file_is_quantized(format, tmp_path):
    path = tmp_path / ("model.xml" if format == "openvino" else "model.onnx")
    report = export_deployable(classifier(), path, format=format, precision="int8", img_size=SIZE,
                               calibration=calibration())  # fmt: skip
    assert report.precision == "int8"
    shipped = openvino_core().read_model(str(path)) if format == "openvino" else onnx.load(str(Path(path)))
    assert_quantized_graph(shipped)

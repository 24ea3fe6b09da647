"""--precision, --threads, --calibration-data and --max-drop on classify eval/predict and export: the
reports, the exit codes and one sentence per bad input."""

import json

import pytest
import torch
from PIL import Image

from metaformer.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tiny_digits_run):
    """A tiny digits run: its checkpoint, with config.json beside it naming the embedded digits."""
    return tiny_digits_run


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))


def one_sentence(err: str) -> str:
    """The error line (progress notes such as "loaded ..." may precede it)."""
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


class Negated(torch.nn.Module):
    """A runner that picks the least likely class: what a broken quantization would do."""

    def __init__(self, runner: torch.nn.Module):
        super().__init__()
        self.runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.runner(x)


def test_eval_int8_reports_fp32_beside_it_calibrated_on_the_training_data(run, tmp_path, capsys):
    argv = ["classify", "eval", "--checkpoint", str(run / "last.safetensors"), "--precision", "int8",
            "--backend", "openvino", "--threads", "1", "--limit", "40",
            "--confusion", str(tmp_path / "c.png")]  # fmt: skip
    assert main([*argv, "--json", "--max-drop", "100"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "int8" and result["backend"] == "openvino"
    assert result["runs_with"] == "openvino int8 (hint f32, 1 threads, LATENCY)"
    assert 0 <= result["agreement"] <= 100
    assert result["drop"] == pytest.approx(result["fp32_top1"] - result["top1"])
    # the agreement measured when it was built, on held-out training images, and the threshold
    assert 0 <= result["held_out_agreement"] <= 100 and result["held_out_images"] == 100
    assert result["min_agreement"] == 99 and result["dropped"] == {}
    assert main(argv + ["--max-drop", "100"]) == 0  # the quantized model is cached: no calibration read
    out = capsys.readouterr().out
    assert "int8 against fp32 on the same images" in out
    assert f"agreement with fp32 {result['held_out_agreement']:.2f}% on 100 images (needed 99%)" in out


def test_a_larger_drop_than_allowed_exits_1_after_the_report(run, tmp_path, capsys, monkeypatch):
    from metaformer.tasks.classify import evaluate

    real = evaluate.prepare_for_inference

    def worse(model, **kwargs):
        runner, name = real(model, **kwargs)
        if kwargs.get("precision", "fp32") == "fp32":
            return runner, name
        return Negated(runner), name

    monkeypatch.setattr(evaluate, "prepare_for_inference", worse)
    argv = ["classify", "eval", "--checkpoint", str(run / "last.safetensors"), "--precision", "bf16",
            "--backend", "torch", "--limit", "40", "--confusion", str(tmp_path / "c.png")]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "bf16 against fp32 on the same images" in captured.out
    assert "points below fp32" in one_sentence(captured.err) and "--max-drop 1" in captured.err


def test_predict_and_export_at_every_precision(run, tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(image)
    ckpt = str(run / "last.safetensors")
    for precision in ("fp32", "bf16", "int8"):
        trust = ["--min-agreement", "0"] if precision == "int8" else []  # a 1-epoch model: any agreement
        argv = ["classify", "predict", str(image), "--checkpoint", ckpt, "--precision", precision, *trust]
        assert main(argv) == 0
        assert capsys.readouterr().out.startswith(f"{image}: ")
    assert main(["export", "poolformer_s12", "--checkpoint", ckpt, "--img-size", "32", "--precision", "int8",
                 "--format", "openvino", "-o", str(tmp_path / "m-ov")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "openvino int8" in out and "OpenVINO runs it" in out
    assert (tmp_path / "m-ov" / "model.bin").is_file()
    assert main(["export", "poolformer_s12", "--checkpoint", ckpt, "--img-size", "32", "--precision", "int8",
                 "-o", str(tmp_path / "m-qdq")]) == 0  # fmt: skip
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "m-qdq" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "OpenVINO runs this QDQ file fast" in capsys.readouterr().out


def test_bad_calibration_sources_are_one_sentence(run, tmp_path, capsys):
    ckpt = str(run / "last.safetensors")
    base = ["classify", "eval", "--checkpoint", ckpt, "--precision", "int8", "--limit", "8",
            "--confusion", str(tmp_path / "c.png")]  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.png").write_bytes(b"not a png")
    alone = tmp_path / "alone"
    alone.mkdir()
    lone = alone / "w.safetensors"
    lone.write_bytes((run / "last.safetensors").read_bytes())  # no config.json beside it
    cases = [
        (base + ["--calibration-data", str(tmp_path / "missing")], "calibration folder .* does not exist"),
        (base + ["--calibration-data", str(empty)], "holds no image files"),
        (base + ["--calibration-data", str(corrupt)], "all 1 image files are unreadable"),
        (
            [
                "classify",
                "eval",
                "--checkpoint",
                str(lone),
                "--precision",
                "int8",
                "--limit",
                "8",
                "--confusion",
                str(tmp_path / "c.png"),
            ],
            "int8 needs calibration images",
        ),  # fmt: skip
        (
            base[:4] + ["--precision", "bf16", "--backend", "onnxruntime"],
            "onnxruntime backend runs fp32 and int8",
        ),
        (
            base[:4] + ["--precision", "int8", "--backend", "torch"],
            "torch backend runs fp32 and bf16, not int8",
        ),
        (
            base[:4] + ["--precision", "int8", "--backend", "compile"],
            "compile backend runs fp32 and bf16, not int8",
        ),
    ]
    import re

    for argv, message in cases:
        assert main(argv) == 1, argv
        assert re.search(message, one_sentence(capsys.readouterr().err)), message


def test_backend_compile_is_accepted_and_reaches_the_compile_backend(run, tmp_path, capsys, monkeypatch):
    """The flag's wiring, with a stand-in for the compile itself (tests/deploy/test_compile.py compiles):
    eval runs on the compile backend, which gets the deployment cache key."""
    from metaformer.deploy.backend_compile import COMPILE
    from metaformer.deploy.backend_torch import TORCH

    keys = []

    def stand_in(model, precision, example, *, key, threads=None, **kwargs):
        keys.append(key)
        runner = TORCH.build(model, precision, example, threads=threads)
        runner.backend = "compile"
        runner.settings.update(compile_s=0.1, compiled=True, cache_hit=False)
        return runner

    monkeypatch.setattr(COMPILE, "build", stand_in)
    argv = ["classify", "eval", "--checkpoint", str(run / "last.safetensors"), "--backend", "compile",
            "--limit", "8", "--json", "--confusion", str(tmp_path / "c.png")]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "compile" and result["runs_with"].startswith("compile fp32")
    assert len(keys) == 1 and len(keys[0]) >= 16

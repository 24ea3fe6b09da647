"""ONNX and TorchScript export: checked files, portable GroupNorm, dynamic batch, atomic writes, CLI."""

import os
import subprocess
import sys

import onnx
import onnxruntime as ort
import pytest
import torch

from metaformer import ExportError, create_model, save_weights
from metaformer.cli import main
from metaformer.deploy.onnx_export import export_model, portable_model
from metaformer.export import ExportConfig, run_export

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "num_classes": 10}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small graphs on a shared 2-core machine: a second thread only waits
    yield
    torch.set_num_threads(threads)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                (1.0 if name.endswith(("norm1.weight", "norm2.weight", "scale")) else 0.0)
                + 0.3 * torch.randn_like(p)
            )
    return model.eval()


def onnx_run(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_poolformer_s12_onnx_round_trip_with_dynamic_batch(tmp_path, size):
    model = randomize(create_model("poolformer_s12"))
    path = tmp_path / "s12.onnx"
    report = export_model(model, path, img_size=size, dynamic_batch=True)
    assert report.max_abs_diff <= 1e-4 and report.checked_batches == (2, 1, 3)
    onnx.checker.check_model(str(path))
    x = torch.randn(4, 3, *size)  # a batch size the export never saw
    with torch.no_grad():
        expected = model(x)
    assert (onnx_run(path, x) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fold", [True, False])
def test_groupnorm_is_exported_as_plain_reductions(tmp_path, fold):
    path = tmp_path / "m.onnx"
    export_model(randomize(create_model("poolformer_s12", **TINY)), path, img_size=(64, 64), fold=fold)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {"GroupNormalization", "InstanceNormalization"}
    assert "ReduceMean" in ops
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]  # a fixed-batch file takes single images


def test_portable_groupnorm_matches_torch_groupnorm():
    norm = torch.nn.GroupNorm(1, 6, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    portable = portable_model(torch.nn.Sequential(norm), fold=False)[0]
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    assert torch.allclose(portable(x), norm(x), atol=1e-5)


@pytest.mark.parametrize("name", ["convformer_s18", "caformer_s18"])
def test_other_families_export_within_tolerance(tmp_path, name):
    model = randomize(create_model(name, **TINY))
    report = export_model(model, tmp_path / "m.onnx", img_size=(64, 64))
    assert report.max_abs_diff <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_round_trip(tmp_path):
    model = randomize(create_model("poolformer_s12", **TINY))
    path = tmp_path / "m.pt"
    export_model(model, path, format="torchscript", img_size=(64, 64), dynamic_batch=True)
    loaded = torch.jit.load(str(path))
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-4


def test_failed_check_writes_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_model(create_model("poolformer_s12", **TINY), path, img_size=(64, 64), atol=0.0)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left behind


def test_export_from_saved_weights_uses_those_weights(tmp_path):
    model = randomize(create_model("poolformer_s12", **TINY))
    save_weights(model, tmp_path / "w.safetensors")
    report = run_export(
        ExportConfig(
            "poolformer_s12", tmp_path / "m", checkpoint=tmp_path / "w.safetensors", img_size=(64, 64)
        )
    )
    x = torch.randn(1, 3, 64, 64)  # a fixed-batch file takes single images
    with torch.no_grad():
        assert (onnx_run(report.path / "model.onnx", x) - model(x)).abs().max().item() <= 1e-4


def test_cli_export_random_init(tmp_path, capsys):
    out = tmp_path / "s"
    args = [
        "export",
        "poolformer_s12",
        "--random-init",
        "--img-size",
        "64",
        "--dynamic-batch",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    assert (out / "model.onnx").is_file() and (out / "metaformer.json").is_file()
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out


def test_cli_export_needs_weights_or_random_init(tmp_path, capsys):
    assert main(["export", "poolformer_s12", "-o", str(tmp_path / "s")]) == 1
    assert "--checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_cli_export_missing_checkpoint_is_a_short_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "metaformer", "export", "poolformer_s12", "--checkpoint", str(missing),
         "-o", str(tmp_path / "s")],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert done.returncode == 1
    assert str(missing) in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_segment_checkpoint_is_refused_with_the_command_that_deploys_it(tmp_path, capsys):
    from metaformer.data.segmentation import SegAugment
    from metaformer.tasks.segment.checkpoint import save_segmenter
    from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter

    overrides = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
    model = create_segmenter(
        SegmenterConfig(2, backbone_overrides=overrides, fpn_channels=8, head_channels=8)
    )
    checkpoint = tmp_path / "seg.safetensors"
    save_segmenter(model, checkpoint, class_names=["a", "b"], augment=SegAugment())
    out = tmp_path / "m"
    assert main(["export", "poolformer_s12", "--checkpoint", str(checkpoint), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "holds a segment model" in err and "segment predict" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

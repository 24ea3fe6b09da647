"""deploy.package through `metaformer export` and `classify predict|eval --checkpoint FOLDER`: the folder
holds the model files and metaformer.json, runs without the torch checkpoint with the same top-1 as the
checkpoint (and as the plain-OpenVINO snippet in docs/deployment.md), refuses bad folders in one sentence
each, and is written whole or not at all."""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer.cli import main
from metaformer.deploy import package
from metaformer.errors import InputSizeError

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


@pytest.fixture
def run(tiny_digits_run):
    """A tiny digits run (32 px): its checkpoint, with config.json beside it."""
    return tiny_digits_run / "last.safetensors"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def export(run, folder, *extra):
    return main(["export", "poolformer_s12", "--checkpoint", str(run), "--output", str(folder), *extra])


def predicted(capsys, checkpoint, images) -> dict[str, str]:
    capsys.readouterr()
    assert main(["classify", "predict", str(images), "--checkpoint", str(checkpoint), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    return {Path(item["path"]).name: item["predictions"][0]["class"] for item in results}


def one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("fmt", ["onnx", "openvino", "torchscript"])
def test_an_exported_folder_predicts_and_evaluates_like_its_checkpoint(run, images, tmp_path, capsys, fmt):
    folder = tmp_path / "shipped"
    assert export(run, folder, "--format", fmt) == 0
    assert f"wrote {folder}/" in capsys.readouterr().out
    meta = json.loads((folder / "metaformer.json").read_text())
    assert meta["input_size"] == [32, 32] and meta["preprocessing"]["input_size"] == [3, 32, 32]  # recorded
    assert meta["format"] == fmt and meta["precision"] == "fp32" and len(meta["class_names"]) == 10
    assert set(meta["files"]) == {p.name for p in folder.iterdir()} - {"metaformer.json"}
    assert {"metaformer", "torch"} <= set(meta["versions"])
    assert predicted(capsys, folder, images) == predicted(capsys, run, images)
    evals = {}
    for checkpoint in (run, folder):
        capsys.readouterr()
        argv = ["classify", "eval", "--checkpoint", str(checkpoint), "--limit", "40", "--json"]
        assert main([*argv, "--confusion", str(tmp_path / "c.png")]) == 0
        evals[checkpoint] = json.loads(capsys.readouterr().out)
    assert evals[folder]["top1"] == evals[run]["top1"] and evals[folder]["images"] == 40


def test_an_int8_folder_records_its_held_out_agreement_and_the_cpu(run, images, tmp_path, capsys):
    folder = tmp_path / "int8"
    assert export(run, folder, "--format", "openvino", "--precision", "int8") == 0
    meta = json.loads((folder / "metaformer.json").read_text())
    assert meta["precision"] == "int8" and meta["runtime"] == "openvino"
    assert 0 <= meta["check"]["agreement_with_fp32"] <= 1 and meta["check"]["cpu"]
    assert meta["check"]["measured_on"].startswith("100 held-out calibration images")
    assert len(meta["calibration"]["sha256"]) == 16
    assert len(predicted(capsys, folder, images)) == 6


def _docs_block(needle: str) -> str:
    return next(b for b in DOCS.read_text().split("```python")[1:] if needle in b).split("```")[0]


@pytest.mark.parametrize(
    ("fmt", "needle"), [("openvino", "ov.Core().compile_model"), ("onnx", "InferenceSession")]
)
def test_the_docs_snippets_give_the_classes_predict_gives(run, images, tmp_path, capsys, fmt, needle):
    """The preparation block, then the plain-runtime block, on a folder `metaformer export` wrote."""
    prepare, runtime = _docs_block('meta = json.load(open(f"{folder}/metaformer.json"))'), _docs_block(needle)
    named = re.search(r'folder = "([^"]+)"', runtime) or re.search(r'folder = "([^"]+)"', prepare)
    folder = tmp_path / named.group(1)  # the ONNX block names its own folder
    assert export(run, folder, "--format", fmt) == 0
    want = predicted(capsys, folder, images)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name, cls in want.items():
            Image.open(images / name).save(tmp_path / "digit.png")
            out, namespace = io.StringIO(), {}
            with contextlib.redirect_stdout(out):
                exec(prepare.replace('"s12-folder"', repr(folder.name)), namespace)
                exec(runtime, namespace)
            assert out.getvalue().strip() == cls, name
    finally:
        os.chdir(cwd)


def test_bad_folders_are_one_sentence_each(run, images, tmp_path, capsys):
    good, other = tmp_path / "good", tmp_path / "other"
    assert export(run, good, "--format", "onnx") == 0
    assert export(run, other, "--format", "onnx", "--img-size", "64") == 0  # another export's file
    capsys.readouterr()

    def refused(folder) -> str:
        assert main(["classify", "predict", str(images), "--checkpoint", str(folder)]) == 1
        return one_sentence(capsys.readouterr().err)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.onnx").write_bytes((good / "model.onnx").read_bytes())
    assert "holds no metaformer.json" in refused(corrupt)
    (corrupt / "metaformer.json").write_text("{not json")
    assert "is not readable JSON" in refused(corrupt)
    (corrupt / "metaformer.json").write_text(json.dumps({"format": "onnx"}))
    assert "lacks precision, files" in refused(corrupt)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "metaformer.json").write_bytes((good / "metaformer.json").read_bytes())
    (mixed / "model.onnx").write_bytes((other / "model.onnx").read_bytes())
    assert "is not the file this folder's metaformer.json was written with" in refused(mixed)
    exported = package.load_folder(good)
    with pytest.raises(
        InputSizeError, match=re.escape("takes 32x32 images, not 64x64; resize them to 32x32")
    ):
        exported(torch.zeros(1, 3, 64, 64))


def test_a_file_name_as_output_is_refused_and_nothing_is_half_written(run, tmp_path, capsys, monkeypatch):
    capsys.readouterr()
    assert export(run, tmp_path / "s12.onnx") == 1
    assert "export now writes a folder" in one_sentence(capsys.readouterr().err)
    folder = tmp_path / "shipped"
    assert export(run, folder) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr("metaformer.deploy.export.export_deployable", broken)
    assert export(run, folder, "--img-size", "64") == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the earlier export, untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folder left
    assert export(run, tmp_path / "new") == 1 and not (tmp_path / "new").exists()

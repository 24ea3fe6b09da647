"""Where a detector's or segmenter's backbone starts: --pretrained (the released weights of --model,
served here from a file:// URL), --init-checkpoint (classify's name for --backbone-checkpoint), or random
weights, where --frozen-stages warns."""

import dataclasses
import logging

import pytest
import torch

from metaformer import create_model
from metaformer.cli import main
from metaformer.data.shapes import ShapesConfig, make_shapes
from metaformer.tasks.detect import DetectTrainConfig
from metaformer.tasks.segment import SegmentTrainConfig
from metaformer.weights import PRETRAINED, load_weights, to_official_keys

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
SEGMENT = ["--model-kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}', "--batch-size", "2"]
SEGMENT += ["--crop-size", "64", "--scale", "64", "64", "--fpn-channels", "8", "--head-channels", "8"]
SEGMENT += ["--recipe", "shapes", "--epochs", "1", "--workers", "0", "--amp", "off"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def release(tmp_path, monkeypatch):
    """poolformer_s12's record pointed at a tiny S12-shaped official checkpoint behind a file:// URL."""
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))
    source = create_model("poolformer_s12", **TINY)
    for param in source.parameters():  # nothing like a fresh initialisation
        torch.nn.init.normal_(param)
    path = tmp_path / "upstream" / "poolformer_s12.pth.tar"
    path.parent.mkdir()
    torch.save(to_official_keys(source.state_dict()), path)
    record = dataclasses.replace(PRETRAINED["poolformer_s12.sail_in1k"], url=path.as_uri(), sha256=None)
    monkeypatch.setitem(PRETRAINED, record.tag, record)
    return source, path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(
        tmp_path_factory.mktemp("data"), ShapesConfig(num_train=4, num_val=2, img_size=64, seed=5)
    )


def test_segment_train_pretrained_starts_from_the_released_weights(release, shapes, tmp_path, capsys):
    """Every stage frozen: after training, the backbone still holds the released weights exactly."""
    source, _ = release
    out = tmp_path / "run"
    argv = ["segment", "train", "--data", str(shapes), "--output", str(out), *SEGMENT]
    assert main([*argv, "--model", "poolformer_s12", "--pretrained", "--frozen-stages", "4"]) == 0
    assert "--frozen-stages" not in capsys.readouterr().err  # weights given: no warning
    backbone = create_model("poolformer_s12", features_only=True, out_norm=True, **TINY)
    trained = {k.removeprefix("neck.body."): v for k, v in _state(out / "best.safetensors").items()}
    backbone.load_state_dict({k: trained[k] for k in backbone.state_dict()})
    released = source.state_dict()
    compared = [k for k in backbone.state_dict() if k.startswith(("stem.", "stages."))]
    assert compared and all(torch.equal(backbone.state_dict()[k], released[k]) for k in compared)


def _state(path):
    from metaformer.weights import read_checkpoint

    return read_checkpoint(path)[0]


def test_pretrained_backbone_weights_are_the_downloaded_release(release):
    _, path = release
    config = DetectTrainConfig(model="poolformer_s12", pretrained=True, model_kwargs=dict(TINY))
    cached = config.backbone_weights()
    assert cached is not None and open(cached, "rb").read() == path.read_bytes()
    model = create_model("poolformer_s12", features_only=True, **TINY)
    assert load_weights(model, cached) is not None


def test_pretrained_drops_the_recipe_trunk_but_keeps_the_users_overrides():
    shapes_trunk = SegmentTrainConfig().resolve().model_kwargs
    assert shapes_trunk["depths"] == (1, 1, 3, 1)  # the shapes recipe's small backbone
    assert SegmentTrainConfig(pretrained=True).resolve().model_kwargs == {}
    assert DetectTrainConfig(backbone_checkpoint="w.pth").resolve().model_kwargs == {}
    users = DetectTrainConfig(pretrained=True, model_kwargs={"layer_scale_init": None}).resolve()
    assert users.model_kwargs == {"layer_scale_init": None}


def test_init_checkpoint_is_classifys_name_for_backbone_checkpoint(capsys):
    for task in ("detect", "segment"):
        assert main([task, "train", "--init-checkpoint", "w.pth", "--print-config"]) == 0
        out = capsys.readouterr().out
        assert '"backbone_checkpoint": "w.pth"' in out


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_pretrained_with_a_checkpoint_is_one_sentence(task, capsys):
    assert main([task, "train", "--pretrained", "--init-checkpoint", "w.pth"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "metaformer: error: pass either --pretrained or --init-checkpoint (--backbone-checkpoint), not both"
    )


def test_frozen_stages_on_a_random_backbone_warn_once_in_one_sentence(caplog):
    with caplog.at_level(logging.WARNING, logger="metaformer"):
        assert DetectTrainConfig(frozen_stages=1).backbone_weights() is None
    (record,) = [r for r in caplog.records if "--frozen-stages" in r.getMessage()]
    message = record.getMessage()
    assert "\n" not in message and message.count(". ") == 0 and "randomly initialised" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="metaformer"):
        DetectTrainConfig(frozen_stages=1, backbone_checkpoint="w.pth").backbone_weights()
        DetectTrainConfig(frozen_stages=-1).backbone_weights()
    assert not caplog.records


@pytest.mark.parametrize("kind", ["empty", "truncated", "folder", "image"])
def test_a_bad_released_file_fails_in_one_sentence(release, shapes, tmp_path, capsys, kind):
    """The file walk for --pretrained's one file input: the downloaded weights."""
    _, path = release
    good = path.read_bytes()
    path.unlink()
    if kind == "folder":
        path.mkdir()
    else:
        path.write_bytes({"empty": b"", "truncated": good[: len(good) // 2]}.get(kind, b"\x89PNG\r\n\x1a\n"))
    argv = ["segment", "train", "--data", str(shapes), "--output", str(tmp_path / "run"), *SEGMENT]
    code = main([*argv, "--model", "poolformer_s12", "--pretrained"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("metaformer: error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "poolformer_s12.pth.tar" in errors[0]

"""weights/layouts.py: layout detection, official <-> ours key mapping, strict loading, convert."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from metaformer import CheckpointError, create_model
from metaformer.cli import main
from metaformer.models import MetaFormer
from metaformer.weights import (
    convert_checkpoint,
    detect_layout,
    load_weights,
    model_from_weights,
    read_metadata,
    read_state_dict,
    remap_baselines_keys,
    remap_official_keys,
    save_weights,
    to_baselines_keys,
    to_official_keys,
)

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


def random_state(name: str, **kwargs) -> dict[str, torch.Tensor]:
    """A full-size model's state dict with random values, without building the model for real."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_model(name, **kwargs).state_dict().items()}
    return {k: torch.randn(shape) for k, shape in shapes.items()}


def official_v1_keys(depths: tuple[int, ...]) -> list[str]:
    """The official sail-sg/poolformer key list, written from PAPER.md 3.2 independently of the code."""
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    block = ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias", "layer_scale_1", "layer_scale_2"]  # fmt: skip
    for i, depth in enumerate(depths):
        if i > 0:
            keys += [f"network.{2 * i - 1}.proj.weight", f"network.{2 * i - 1}.proj.bias"]
        keys += [f"network.{2 * i}.{j}.{p}" for j in range(depth) for p in block]
    return keys + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize(
    ("name", "depths"), [("poolformer_s12", (2, 2, 6, 2)), ("poolformer_s36", (6, 6, 18, 6))]
)
def test_official_v1_mapping_round_trip_on_full_key_lists(name, depths):
    import timm

    with torch.device("meta"):
        timm_state = timm.create_model(name).state_dict()
    official = to_official_keys(timm_state)
    assert sorted(official) == sorted(official_v1_keys(depths))
    if name == "poolformer_s12":
        assert len(official) == 132  # PAPER.md 3.2
    back = remap_official_keys(official)
    assert list(back) == list(timm_state)
    assert all(back[k].shape == timm_state[k].shape for k in back)


def test_official_v1_mapping_parses_indices_not_prefixes():
    """'network.1' is a prefix of 'network.10': a 6-stage model has both (stages at 0, 2, ..., 10)."""
    model = MetaFormer(depths=(1,) * 6, dims=(8, 16, 24, 32, 40, 48), num_classes=2)
    official = to_official_keys(model.state_dict())
    assert "network.10.0.norm1.weight" in official and "network.9.proj.weight" in official
    assert official["network.10.0.norm1.weight"].shape == (48,)
    assert official["network.1.proj.weight"].shape == (16, 8, 3, 3)
    back = remap_official_keys(official)
    assert list(back) == list(model.state_dict())


def test_official_v1_mapping_handles_position_embeddings_of_hybrid_ablations():
    state = random_state("metaformer_ppaa_s12_224")
    official = to_official_keys(state)
    # official order: stage0, down1, stage1, down2, pos_embed2, stage2, down3, stage3
    assert official["network.4.pos_embed"].shape == (1, 320, 14, 14)
    assert "network.5.0.token_mixer.qkv.weight" in official and "network.6.proj.weight" in official
    assert "network.7.1.token_mixer.proj.bias" in official
    back = remap_official_keys(official)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["convformer_s18", "caformer_s18"])
def test_baselines_mapping_round_trip_reshapes_pointwise_weights(name):
    state = random_state(name)
    official = to_baselines_keys(state)
    for key in ("downsample_layers.0.conv.weight", "downsample_layers.0.post_norm.weight",
                "downsample_layers.1.pre_norm.weight", "stages.1.2.mlp.act.scale", "norm.bias",
                "head.fc1.weight", "head.norm.weight", "head.fc2.bias"):  # fmt: skip
        assert key in official
    assert official["stages.0.0.mlp.fc1.weight"].shape == (256, 64)  # Linear, channels-last
    assert official["stages.3.0.mlp.fc2.weight"].shape == (512, 2048)
    if name == "caformer_s18":
        assert official["stages.2.0.token_mixer.qkv.weight"].shape == (960, 320)
    else:
        assert official["stages.2.0.token_mixer.pwconv1.weight"].shape == (640, 320)
    back = remap_baselines_keys(official)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_detect_layout_from_sentinel_keys(tmp_path):
    state = random_state("poolformer_s12", **TINY)
    assert detect_layout(state) == "timm"
    assert detect_layout(to_official_keys(state)) == "official"
    assert detect_layout(to_baselines_keys(random_state("poolformerv2_s12", **TINY))) == "official_baselines"
    assert detect_layout(state, {"format": "metaformer"}) == "metaformer"
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout .*first keys: fc.weight"):
        detect_layout({"fc.weight": torch.zeros(1)})


def test_wrong_size_variant_is_refused_with_a_guess(tmp_path):
    path = tmp_path / "poolformer_s12.pth.tar"
    torch.save(to_official_keys(random_state("poolformer_s12")), path)
    with torch.device("meta"), pytest.raises(CheckpointError) as info:
        create_model("poolformer_m36", checkpoint_path=path)
    message = str(info.value)
    assert "does not fit poolformer_m36" in message
    assert "wrong shape (stem.conv.weight [64, 3, 7, 7] vs [96, 3, 7, 7]" in message
    assert "checkpoint dims 64..512 but model dims 96..768: a poolformer_s12" in message
    assert "pass the matching model name" in message
    with (
        torch.device("meta"),
        pytest.raises(CheckpointError, match="depths 2,2,6,2 but model depths 4,4,12,4"),
    ):
        create_model("poolformer_s24", checkpoint_path=path)


def test_other_num_classes_reinitialises_only_the_classifier(tmp_path, caplog):
    source = create_model("poolformer_s12", num_classes=10, **TINY)
    path = tmp_path / "ten.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="metaformer.weights"):
        model = create_model("poolformer_s12", num_classes=4, checkpoint_path=path, **TINY)
    assert "checkpoint has 10 classes, model has 4: classifier re-initialised" in caplog.text
    assert model.head.fc.weight.shape == (4, 64)
    for key, value in source.state_dict().items():
        if not key.startswith("head.fc."):
            assert torch.equal(model.state_dict()[key], value), key


def test_mlp_head_keeps_pretrained_hidden_layers_when_classes_differ(tmp_path):
    source = create_model("convformer_s18", num_classes=10, **TINY)
    path = tmp_path / "ten.safetensors"
    save_weights(source, path)
    model = create_model("convformer_s18", num_classes=3, **TINY)
    report = load_weights(model, path)
    assert report.reinitialized_classifier
    assert sorted(report.mismatched) == ["head.fc.fc2.bias", "head.fc.fc2.weight"]
    assert torch.equal(model.head.fc.fc1.weight, source.head.fc.fc1.weight)
    assert model.head.fc.fc2.weight.shape == (3, 256)


def test_backbone_and_headless_models_load_classifier_checkpoints(tmp_path):
    source = create_model("poolformerv2_s12", num_classes=5, **TINY)
    path = tmp_path / "cls.pth"
    torch.save(to_baselines_keys(source.state_dict()), path)
    features = create_model("poolformerv2_s12", features_only=True, out_indices=(0, 1), out_norm=True, **TINY)
    report = load_weights(features, path)
    assert report.layout == "official_baselines"
    assert "head.fc.weight" in report.unexpected and "stages.2.downsample.conv.weight" in report.unexpected
    assert report.missing == [f"out_norms.{i}.{p}" for i in (0, 1) for p in ("bias", "weight")]
    assert torch.equal(features.stages[1].blocks[0].mlp.fc1.weight, source.stages[1].blocks[0].mlp.fc1.weight)
    headless = create_model("poolformerv2_s12", num_classes=0, checkpoint_path=path, **TINY)
    assert torch.equal(headless.head.norm.weight, source.head.norm.weight)
    via_factory = create_model("poolformerv2_s12", features_only=True, checkpoint_path=path, **TINY)
    assert torch.equal(via_factory.stem.conv.weight, source.stem.conv.weight)


def test_checkpoints_load_into_either_final_norm(tmp_path):
    source = create_model("poolformer_s12", final_norm="pooled", **TINY)
    path = tmp_path / "official.pth.tar"
    torch.save(to_official_keys(source.state_dict()), path)
    for final_norm in ("map", "pooled"):
        model = create_model("poolformer_s12", final_norm=final_norm, checkpoint_path=path, **TINY)
        assert torch.equal(model.head.norm.weight, source.head.norm.weight)


def test_convert_detects_s24_from_official_layout_and_keeps_num_classes(tmp_path):
    state = random_state("poolformer_s24", num_classes=10)
    src = tmp_path / "checkpoint.pth.tar"
    torch.save(to_official_keys(state), src)
    dst = tmp_path / "s24.safetensors"
    assert convert_checkpoint(src, dst) == "poolformer_s24"
    meta = read_metadata(dst)
    assert meta["model_name"] == "poolformer_s24" and meta["config"]["num_classes"] == 10
    assert meta["source_layout"] == "official"
    converted = read_state_dict(dst)
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_convert_refuses_ambiguous_tensors_unless_named(tmp_path):
    state = random_state("poolformerv2_s12")  # identical shapes to identityformer_s12
    src = tmp_path / "weights.pth"
    torch.save(state, src)
    with pytest.raises(CheckpointError, match="fit poolformerv2_s12 and identityformer_s12 .*pass the model"):
        convert_checkpoint(src, tmp_path / "out.safetensors")
    src_named = tmp_path / "identityformer_s12.pth"
    torch.save(to_baselines_keys(state), src_named)
    assert convert_checkpoint(src_named, tmp_path / "out.safetensors") == "identityformer_s12"
    model = model_from_weights(tmp_path / "out.safetensors")
    assert model.model_config["mixers"] == ("identity",) * 4
    assert model.model_config["dims"] == (64, 128, 320, 512)
    del state["stages.3.blocks.0.mlp.fc2.weight"]
    torch.save(state, src)
    with pytest.raises(CheckpointError, match="no registered model matches .*pass the model name"):
        convert_checkpoint(src, tmp_path / "x.safetensors")


def test_cli_convert_in_process(tmp_path, capsys):
    src = tmp_path / "weights.pth"
    torch.save(random_state("poolformerv2_s12"), src)
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst)]) == 1
    assert "pass the model name" in capsys.readouterr().err
    assert not dst.exists()
    assert main(["convert", str(src), str(dst), "--model", "poolformerv2_s12"]) == 0
    assert "poolformerv2_s12" in capsys.readouterr().out
    assert read_metadata(dst)["model_name"] == "poolformerv2_s12"


def test_cli_convert_missing_file_subprocess(tmp_path):
    missing = tmp_path / "missing.pth"
    result = subprocess.run(
        [sys.executable, "-m", "metaformer", "convert", str(missing), str(tmp_path / "out.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

"""Checkpoints of other ecosystems: HF transformers, mmpretrain, mmdet / mmseg; hub-style folders.

transformers files are written by the real ``transformers`` package; the OpenMMLab files are built here
with the key names those projects write (mmpretrain ``models/backbones/poolformer.py``, sail-sg
``detection/`` and ``segmentation/`` on mmdet v2 / mmseg v0.x), independently of the code under test.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from metaformer import CheckpointError, create_model, save_pretrained
from metaformer.cli import main
from metaformer.tasks.dense.fpn import create_backbone
from metaformer.weights import convert_checkpoint, detect_layout, model_from_weights, read_metadata

transformers = pytest.importorskip("transformers")

HF_SIZES = {
    "poolformer_s12": dict(
        depths=[2, 2, 6, 2], hidden_sizes=[64, 128, 320, 512], layer_scale_init_value=1e-5
    ),
    "poolformer_m36": dict(
        depths=[6, 6, 18, 6], hidden_sizes=[96, 192, 384, 768], layer_scale_init_value=1e-6
    ),
}
LABELS = ["cat", "dog", "fox", "owl", "elk"]


def randomise(module: torch.nn.Module) -> None:
    """Every parameter random, norms and layer scales included (at their init a broken mixer hides)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1:  # norm weights / biases, layer scales, conv biases
                param.copy_(
                    torch.randn_like(param) * 0.5 + (1.0 if "weight" in name or "scale" in name else 0)
                )
            else:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=sorted(HF_SIZES))
def hf_folder(request, tmp_path_factory):
    """(model name, save_pretrained folder, the transformers model) with random weights and 5 labels."""
    torch.manual_seed(0)
    config = transformers.PoolFormerConfig(
        **HF_SIZES[request.param],
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model = transformers.PoolFormerForImageClassification(config).eval()
    randomise(model)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, folder, model


def test_transformers_head_is_norm_on_the_map_then_mean():
    """Know the reference: its logits are classifier(GroupNorm(map).mean), our final_norm="map"."""
    import inspect

    from transformers.models.poolformer import modeling_poolformer

    source = inspect.getsource(modeling_poolformer.PoolFormerForImageClassification.forward)
    assert "self.classifier(self.norm(sequence_output).mean([-2, -1]))" in source
    assert create_model("poolformer_s12").head.final_norm == "map"


def test_transformers_folder_rebuilds_the_model_with_logits_equal_to_transformers(hf_folder):
    name, folder, hf = hf_folder
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        model = model_from_weights(folder).eval()
        err = rel_err(model(x), ref)
    assert model.model_name == name and model.num_classes == 5
    assert model.class_names == LABELS
    assert err <= 1e-5, err


@pytest.mark.parametrize("source", ["folder", "model.safetensors", "pytorch_model.bin"])
def test_transformers_checkpoint_loads_into_create_model_exactly(hf_folder, source, tmp_path):
    name, folder, hf = hf_folder
    if source == "folder":
        path = folder
    elif source == "model.safetensors":
        path = folder / "model.safetensors"
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(hf.state_dict(), path)  # what save_pretrained(safe_serialization=False) writes
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
        model = create_model(name, num_classes=5, checkpoint_path=path).eval()
        err = rel_err(model(x), ref)
        if source == "folder":  # the test can tell the two head placements apart
            timm_head = create_model(name, num_classes=5, checkpoint_path=path, final_norm="pooled").eval()
            assert rel_err(timm_head(x), ref) > 1e-3
    assert err <= 1e-5, err


def test_bare_transformers_poolformer_model_matches_our_features(tmp_path):
    config = transformers.PoolFormerConfig()
    hf = transformers.PoolFormerModel(config).eval()
    randomise(hf)
    hf.save_pretrained(tmp_path)
    assert all(k.startswith("encoder.") for k in hf.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model = model_from_weights(tmp_path).eval()  # a backbone: PoolFormerModel has no final norm
        assert model.out_indices == (0, 1, 2, 3) and model.out_norm is None
        err = rel_err(model(x)[-1], hf(pixel_values=x).last_hidden_state)
    assert err <= 1e-5, err


@pytest.mark.parametrize("hf_folder", ["poolformer_m36"], indirect=True)  # the one size under test
def test_transformers_m36_given_to_s12_names_the_mismatch(hf_folder):
    name, folder, _ = hf_folder
    with pytest.raises(
        CheckpointError, match=r"transformers layout.*dims 96..768 but model dims 64..512.*m36"
    ):
        create_model("poolformer_s12", num_classes=5, checkpoint_path=folder / "model.safetensors")


def test_transformers_config_that_the_shapes_cannot_show_is_checked(tmp_path):
    hf = transformers.PoolFormerForImageClassification(
        transformers.PoolFormerConfig(pool_size=5, num_labels=3)
    )
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="pool size 5"):
        create_model("poolformer_s12", num_classes=3, checkpoint_path=tmp_path)
    model = model_from_weights(tmp_path)  # the config's pool size is rebuilt
    assert model.model_config["mixer_kwargs"][0] == {"pool_size": 5}


@pytest.mark.parametrize("hf_folder", ["poolformer_s12"], indirect=True)  # one size is enough for convert
def test_transformers_folder_converts_to_our_file_and_folder(hf_folder, tmp_path):
    name, folder, hf = hf_folder
    assert convert_checkpoint(folder, tmp_path / "s12.safetensors") == name
    assert read_metadata(tmp_path / "s12.safetensors")["class_names"] == LABELS
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "folder"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_name"] == name and config["class_names"] == LABELS
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        err = rel_err(model_from_weights(tmp_path / "out").eval()(x), hf(pixel_values=x).logits)
    assert err <= 1e-5


# --------------------------------------------------------------------------- our own folders
def test_save_pretrained_folder_round_trips_name_config_classes_and_preprocessing(tmp_path):
    model = create_model(
        "poolformer_s12", num_classes=3, depths=(1, 1, 2, 1), mixer_kwargs=({"pool_size": 5},) * 4
    )
    randomise(model)
    save_pretrained(model.eval(), tmp_path / "hub", class_names=["a", "b", "c"])
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["model_name"] == "poolformer_s12" and config["config"]["depths"] == [1, 1, 2, 1]
    assert config["class_names"] == ["a", "b", "c"] and config["preprocessing"]["input_size"] == [3, 224, 224]
    rebuilt = model_from_weights(tmp_path / "hub").eval()
    again = create_model(
        "poolformer_s12", num_classes=3, depths=(1, 1, 2, 1), mixer_kwargs=({"pool_size": 5},) * 4,
        checkpoint_path=tmp_path / "hub",
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x)) and torch.equal(again(x), model(x))
    assert rebuilt.class_names == ["a", "b", "c"] and rebuilt.preprocessing == config["preprocessing"]


def test_save_pretrained_backbone_comes_back_as_a_backbone(tmp_path):
    backbone = create_backbone("poolformer_s12", depths=(1, 1, 1, 1), out_indices=(1, 2, 3))
    save_pretrained(backbone, tmp_path)
    rebuilt = model_from_weights(tmp_path)
    assert rebuilt.out_indices == (1, 2, 3) and rebuilt.out_norm == "groupnorm1"


def test_folder_without_weights_is_one_sentence(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has neither model.safetensors nor pytorch_model.bin"):
        create_model("poolformer_s12", checkpoint_path=tmp_path)


# --------------------------------------------------------------------------- OpenMMLab
V1_BLOCK = ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
            "mlp.fc2.weight", "mlp.fc2.bias", "layer_scale_1", "layer_scale_2"]  # fmt: skip
S12 = ((2, 2, 6, 2), (64, 128, 320, 512))


def v1_backbone(depths=S12[0], dims=S12[1], prefix="backbone.") -> dict[str, torch.Tensor]:
    """sail-sg / mmpretrain PoolFormer trunk tensors: patch_embed.proj, network.{0..6} (random values)."""
    state = {f"{prefix}patch_embed.proj.weight": torch.randn(dims[0], 3, 7, 7) * 0.1,
             f"{prefix}patch_embed.proj.bias": torch.randn(dims[0])}  # fmt: skip
    for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        if i:
            state[f"{prefix}network.{2 * i - 1}.proj.weight"] = torch.randn(dim, dims[i - 1], 3, 3) * 0.05
            state[f"{prefix}network.{2 * i - 1}.proj.bias"] = torch.randn(dim)
        for j in range(depth):
            for p in V1_BLOCK:
                shape = {"mlp.fc1.weight": (4 * dim, dim, 1, 1), "mlp.fc1.bias": (4 * dim,),
                         "mlp.fc2.weight": (dim, 4 * dim, 1, 1)}.get(p, (dim,))  # fmt: skip
                state[f"{prefix}network.{2 * i}.{j}.{p}"] = torch.randn(shape) * (
                    0.05 if len(shape) == 4 else 1
                )
    return state


def norms(indices, dims=S12[1]) -> dict[str, torch.Tensor]:
    return {f"backbone.norm{n}.{p}": torch.randn(dims[n // 2]) for n in indices for p in ("weight", "bias")}


def test_mmpretrain_classifier_equals_the_same_tensors_in_official_layout(tmp_path):
    state = {
        **v1_backbone(),
        **norms([6]),
        "head.fc.weight": torch.randn(10, 512),
        "head.fc.bias": torch.randn(10),
    }
    torch.save({"meta": {"epoch": 300}, "state_dict": state}, tmp_path / "poolformer-s12_in1k.pth")
    official = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.network.") or
                k.startswith("backbone.patch_embed.")}  # fmt: skip
    official.update({"norm.weight": state["backbone.norm6.weight"], "norm.bias": state["backbone.norm6.bias"],
                     "head.weight": state["head.fc.weight"], "head.bias": state["head.fc.bias"]})  # fmt: skip
    torch.save(official, tmp_path / "official.pth")
    assert detect_layout(state) == "mmpretrain"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = create_model(
            "poolformer_s12", num_classes=10, checkpoint_path=tmp_path / "poolformer-s12_in1k.pth"
        )
        ref = create_model("poolformer_s12", num_classes=10, checkpoint_path=tmp_path / "official.pth")
        assert torch.equal(ours.eval()(x), ref.eval()(x))
    assert (
        convert_checkpoint(tmp_path / "poolformer-s12_in1k.pth", tmp_path / "c.safetensors")
        == "poolformer_s12"
    )


def retinanet_state() -> dict[str, torch.Tensor]:
    """An mmdet v2 RetinaNet checkpoint: FORK_LAST3 (no norm0), FPN from level 1, RetinaHead."""
    state = {**v1_backbone(), **norms([2, 4, 6])}
    for i, c in enumerate((128, 320, 512)):
        state[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(256, c, 1, 1)
    state["neck.fpn_convs.3.conv.weight"] = torch.randn(256, 512, 3, 3)  # P6 on the input (C5)
    state["bbox_head.retina_cls.weight"] = torch.randn(720, 256, 3, 3)
    return state


def test_mmdet_backbone_loads_with_its_output_norms(tmp_path, caplog):
    state = retinanet_state()
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "retinanet_poolformer_s12_fpn_1x_coco.pth")
    assert detect_layout(state) == "mmdet_mmseg"
    path = tmp_path / "retinanet_poolformer_s12_fpn_1x_coco.pth"
    backbone = create_backbone("poolformer_s12", out_indices=(1, 2, 3), checkpoint_path=path).eval()
    for k, n in enumerate((2, 4, 6)):
        assert torch.equal(backbone.out_norms[k].weight, state[f"backbone.norm{n}.weight"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = backbone.stages[0](backbone.stem(x))
        c3 = backbone.stages[1](maps)
        expected = F.group_norm(c3, 1, state["backbone.norm2.weight"], state["backbone.norm2.bias"], 1e-5)
        assert torch.allclose(backbone(x)[0], expected, atol=1e-6)
    with caplog.at_level(
        logging.WARNING
    ):  # Mask R-CNN wants four outputs: stage 0's norm stays fresh, loudly
        full = create_backbone("poolformer_s12", checkpoint_path=path)
    assert "no output norm for stage(s) 0" in caplog.text
    assert torch.equal(full.out_norms[0].weight, torch.ones(64))
    converted = tmp_path / "backbone.safetensors"
    assert convert_checkpoint(path, converted) == "poolformer_s12"
    assert model_from_weights(converted).out_indices == (1, 2, 3)


def test_dense_checkpoint_into_a_classifier_says_use_a_backbone(tmp_path):
    torch.save({**v1_backbone(), **norms([0, 2, 4, 6])}, tmp_path / "mask_rcnn.pth")
    with pytest.raises(CheckpointError, match="detection/segmentation backbone.*create_backbone"):
        create_model("poolformer_s12", checkpoint_path=tmp_path / "mask_rcnn.pth")

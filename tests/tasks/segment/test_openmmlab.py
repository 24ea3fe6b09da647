"""Official dense checkpoints: mmseg Semantic FPN loads whole; mmdet backbones feed our detectors.

The files are built with the key names mmseg v0.x / mmdet v2 write (FPN ``neck.lateral_convs.{i}.conv``,
``neck.fpn_convs.{i}.conv``; FPNHead ``decode_head.scale_heads.{i}.{k}.conv/.bn`` with weight-free
Upsample entries in between; ``decode_head.conv_seg``), written here independently of the mapping.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from metaformer.cli import main
from metaformer.data.shapes import ShapesConfig, make_shapes
from metaformer.tasks.detect.model import DetectorConfig, create_detector
from metaformer.tasks.segment.checkpoint import load_segmenter

DIMS = (64, 128, 320, 512)
CLASSES = ("background", "circle", "rectangle", "triangle")


def v1_backbone(depths=(2, 2, 6, 2), dims=DIMS) -> dict[str, torch.Tensor]:
    state = {"backbone.patch_embed.proj.weight": torch.randn(dims[0], 3, 7, 7) * 0.1,
             "backbone.patch_embed.proj.bias": torch.randn(dims[0])}  # fmt: skip
    for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        if i:
            state[f"backbone.network.{2 * i - 1}.proj.weight"] = torch.randn(dim, dims[i - 1], 3, 3) * 0.05
            state[f"backbone.network.{2 * i - 1}.proj.bias"] = torch.randn(dim)
        for j in range(depth):
            pre = f"backbone.network.{2 * i}.{j}."
            for p in ("norm1", "norm2"):
                state[pre + p + ".weight"], state[pre + p + ".bias"] = torch.randn(dim) + 1, torch.randn(dim)
            state[pre + "mlp.fc1.weight"] = torch.randn(4 * dim, dim, 1, 1) / dim**0.5
            state[pre + "mlp.fc1.bias"] = torch.randn(4 * dim)
            state[pre + "mlp.fc2.weight"] = torch.randn(dim, 4 * dim, 1, 1) / (4 * dim) ** 0.5
            state[pre + "mlp.fc2.bias"] = torch.randn(dim)
            state[pre + "layer_scale_1"], state[pre + "layer_scale_2"] = torch.randn(dim), torch.randn(dim)
    for n in (0, 2, 4, 6):
        state[f"backbone.norm{n}.weight"] = torch.randn(dims[n // 2]) + 1
        state[f"backbone.norm{n}.bias"] = torch.randn(dims[n // 2])
    return state


def mmseg_semantic_fpn(num_classes: int, fpn: int = 256, head: int = 128) -> dict[str, torch.Tensor]:
    state = v1_backbone()
    for i, c in enumerate(DIMS):
        state[f"neck.lateral_convs.{i}.conv.weight"] = torch.randn(fpn, c, 1, 1) / c**0.5
        state[f"neck.lateral_convs.{i}.conv.bias"] = torch.randn(fpn)
        state[f"neck.fpn_convs.{i}.conv.weight"] = torch.randn(fpn, fpn, 3, 3) / (9 * fpn) ** 0.5
        state[f"neck.fpn_convs.{i}.conv.bias"] = torch.randn(fpn)
    for i in range(4):
        for step in range(max(1, i)):
            k = 2 * step if i else 0  # Upsample modules take the odd Sequential indices
            cin = fpn if step == 0 else head
            pre = f"decode_head.scale_heads.{i}.{k}."
            state[pre + "conv.weight"] = torch.randn(head, cin, 3, 3) / (9 * cin) ** 0.5
            state[pre + "bn.weight"], state[pre + "bn.bias"] = torch.rand(head) + 0.5, torch.randn(head)
            state[pre + "bn.running_mean"], state[pre + "bn.running_var"] = (
                torch.randn(head),
                torch.rand(head) + 0.5,
            )
            state[pre + "bn.num_batches_tracked"] = torch.tensor(40000)
    state["decode_head.conv_seg.weight"] = torch.randn(num_classes, head, 1, 1) / head**0.5
    state["decode_head.conv_seg.bias"] = torch.randn(num_classes)
    return state


def mmseg_forward(state: dict[str, torch.Tensor], feats: list[torch.Tensor], size) -> torch.Tensor:
    """mmseg v0.x FPN (nearest top-down) + FPNHead + EncoderDecoder resize, from the mmseg tensors."""
    lat = [
        F.conv2d(f, state[f"neck.lateral_convs.{i}.conv.weight"], state[f"neck.lateral_convs.{i}.conv.bias"])
        for i, f in enumerate(feats)
    ]
    for i in range(3, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
    fpn = "neck.fpn_convs.{}.conv."
    outs = [
        F.conv2d(x, state[fpn.format(i) + "weight"], state[fpn.format(i) + "bias"], padding=1)
        for i, x in enumerate(lat)
    ]
    total = None
    for i, x in enumerate(outs):
        for step in range(max(1, i)):
            pre = f"decode_head.scale_heads.{i}.{2 * step if i else 0}."
            x = F.conv2d(x, state[pre + "conv.weight"], padding=1)
            mean, var = state[pre + "bn.running_mean"], state[pre + "bn.running_var"]
            x = F.batch_norm(x, mean, var, state[pre + "bn.weight"], state[pre + "bn.bias"], eps=1e-5).relu()
            if i:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        total = x if total is None else total + F.interpolate(x, size=total.shape[2:], mode="bilinear")
    logits = F.conv2d(total, state["decode_head.conv_seg.weight"], state["decode_head.conv_seg.bias"])
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def mmseg_file(tmp_path_factory):
    torch.manual_seed(0)
    state = mmseg_semantic_fpn(len(CLASSES))
    path = tmp_path_factory.mktemp("mmseg") / "fpn_poolformer_s12_ade20k_40k.pth"
    torch.save(
        {"meta": {"CLASSES": CLASSES, "PALETTE": [[0, 0, 0]] * 4, "iter": 40000}, "state_dict": state}, path
    )
    return path, state


def test_mmseg_semantic_fpn_maps_module_for_module(mmseg_file):
    path, state = mmseg_file
    model, names, augment = load_segmenter(path)
    assert names == list(CLASSES) and augment.scale == (2048, 512)
    assert model.segmenter_config.backbone == "poolformer_s12"
    torch.manual_seed(1)
    images = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        x = (images - model.mean) / model.std
        feats = model.neck.body(x)
        expected = mmseg_forward(state, feats, images.shape[-2:])
        out = model(images)
    assert out.shape == (1, len(CLASSES), 64, 96)
    assert float((out - expected).abs().max() / expected.abs().max()) <= 1e-5
    for i, n in enumerate((0, 2, 4, 6)):  # the output norms are the checkpoint's, not fresh ones
        assert torch.equal(model.neck.body.out_norms[i].weight, state[f"backbone.norm{n}.weight"])


def test_mmseg_checkpoint_with_an_unmapped_module_is_refused(tmp_path):
    state = mmseg_semantic_fpn(4, fpn=32, head=16)
    state["auxiliary_head.conv_seg.weight"] = torch.randn(4, 16, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "upernet_poolformer_s12.pth")
    with pytest.raises(Exception, match="1 unexpected.*auxiliary_head.conv_seg.weight"):
        load_segmenter(tmp_path / "upernet_poolformer_s12.pth")


def test_segment_eval_runs_an_official_checkpoint(mmseg_file, tmp_path, capsys):
    path, _ = mmseg_file
    data = make_shapes(tmp_path / "data", ShapesConfig(num_train=1, num_val=1, img_size=64, seed=3))
    assert main(["segment", "eval", "--checkpoint", str(path), "--data", str(data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 1 and set(metrics["per_class_IoU"]) == set(CLASSES)


@pytest.mark.parametrize(("arch", "norms"), [("retinanet", (2, 4, 6)), ("maskrcnn", (0, 2, 4, 6))])
def test_official_detection_backbones_feed_our_detectors(arch, norms, tmp_path):
    state = {
        k: v for k, v in v1_backbone().items() if not any(f"norm{n}." in k for n in {0, 2, 4, 6} - set(norms))
    }
    state["neck.lateral_convs.0.conv.weight"] = torch.randn(256, DIMS[4 - len(norms)], 1, 1)
    state["bbox_head.retina_cls.weight" if arch == "retinanet" else "rpn_head.rpn_conv.weight"] = torch.randn(
        1
    )
    path = tmp_path / f"{arch}_poolformer_s12_fpn_1x_coco.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    detector = create_detector(DetectorConfig(num_classes=3, arch=arch), backbone_checkpoint=path)
    body = detector.backbone.body
    assert torch.equal(body.stem.conv.weight, state["backbone.patch_embed.proj.weight"])
    assert torch.equal(
        body.stages[3].blocks[1].layer_scale2.scale, state["backbone.network.6.1.layer_scale_2"]
    )
    for k, n in enumerate(norms):
        assert torch.equal(body.out_norms[k].bias, state[f"backbone.norm{n}.bias"])

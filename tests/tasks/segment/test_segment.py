import math

import pytest
import torch
from torch import nn

from metaformer.data.segmentation import IGNORE_INDEX, SegAugment
from metaformer.errors import ConfigError
from metaformer.tasks.segment.checkpoint import load_segmenter, save_segmenter
from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter, segmentation_loss
from metaformer.tasks.segment.train import (
    SegmentationTask,
    SegmentTrainConfig,
    confusion_matrix,
    poly_scheduler,
    segmentation_metrics,
)

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


def _tiny(num_classes: int = 4) -> nn.Module:
    config = SegmenterConfig(
        num_classes=num_classes, backbone_overrides=TINY, fpn_channels=16, head_channels=8
    )
    return create_segmenter(config)


def test_head_follows_panoptic_fpn_and_logits_come_back_at_input_size():
    model = _tiny()
    convs_per_level = [
        sum(isinstance(m, nn.Conv2d) for m in head.modules()) for head in model.head.scale_heads
    ]
    ups_per_level = [
        sum(isinstance(m, nn.Upsample) for m in head.modules()) for head in model.head.scale_heads
    ]
    assert convs_per_level == [1, 1, 2, 3]  # strides 4, 8, 16, 32 brought to stride 4
    assert ups_per_level == [0, 1, 2, 3]
    assert [b[0].in_channels for b in model.neck.fpn.inner_blocks] == [8, 16, 32, 64]  # from feature_info
    assert model.head.classifier.kernel_size == (1, 1) and model.head.classifier.in_channels == 8
    logits = model(torch.rand(2, 3, 64, 96))
    assert logits.shape == (2, 4, 64, 96)
    assert model(torch.rand(1, 3, 70, 50)).shape == (1, 4, 70, 50)  # not a multiple of 32


def test_one_training_step_updates_neck_and_head_and_ignores_255():
    model = _tiny(3)
    task = SegmentationTask(["a", "b", "c"], SegAugment())
    images = torch.rand(2, 3, 64, 64)
    targets = torch.randint(0, 3, (2, 64, 64))
    targets[:, :10] = IGNORE_INDEX
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.named_parameters()}
    loss, n = task.train_step(model, (images, targets))
    loss.backward()
    optimizer.step()
    assert n == 2 and math.isfinite(loss.item())
    changed = {k.split(".")[0] for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"neck", "head"}
    ignored_only = torch.full((2, 64, 64), IGNORE_INDEX)
    ignored_only[:, 0, 0] = 1
    loss_one_pixel, _ = task.train_step(model, (images, ignored_only))
    assert math.isfinite(loss_one_pixel.item())


def test_confusion_matrix_and_metrics_on_a_known_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 1]])
    conf = confusion_matrix(pred, target, num_classes=4)
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)  # the ignored pixel (predicted 1) is not counted
    metrics = segmentation_metrics(conf, ["a", "b", "c", "d"])
    iou = {"a": 1 / 3, "b": 2 / 3, "c": 2 / 3}
    for name, value in iou.items():
        assert metrics["per_class_IoU"][name] == pytest.approx(value, abs=1e-6)
    assert metrics["per_class_IoU"]["d"] is None  # never labelled nor predicted: left out of the mean
    assert metrics["mIoU"] == pytest.approx(sum(iou.values()) / 3)
    assert metrics["pixel_acc"] == pytest.approx(5 / 7)
    assert metrics["mAcc"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)


def test_metrics_accumulate_over_the_data_set_not_per_batch():
    model = _tiny(2).eval()
    task = SegmentationTask(["bg", "fg"], SegAugment())
    images = [torch.rand(1, 3, 64, 64) for _ in range(3)]
    targets = [torch.randint(0, 2, (1, 64, 64)) for _ in range(3)]
    targets[2][:] = 1  # a batch with a single class would dominate a per-batch mean
    with torch.no_grad():
        metrics = task.evaluate(model, list(zip(images, targets, strict=True)))
        preds = [model(x).argmax(1)[0] for x in images]
    whole = sum(confusion_matrix(p, t[0], 2) for p, t in zip(preds, targets, strict=True))
    assert torch.equal(task.confusion, whole)
    assert metrics["mIoU"] == pytest.approx(segmentation_metrics(whole)["mIoU"])
    assert set(metrics) == {"mIoU", "mAcc", "pixel_acc", "loss"}


def test_segmenter_weights_round_trip(tmp_path):
    model = _tiny(3).eval()
    augment = SegAugment(scale=(256, 64), crop_size=(64, 64))
    save_segmenter(model, tmp_path / "seg.safetensors", class_names=["x", "y", "z"], augment=augment)
    loaded, names, aug = load_segmenter(tmp_path / "seg.safetensors")
    assert names == ["x", "y", "z"] and aug == augment
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_poly_schedule_decays_to_zero_per_iteration():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = poly_scheduler(opt, total_updates=100, power=0.9, warmup_iters=0, lr=2e-4)
    lrs = []
    for step in range(1, 101):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[49] == pytest.approx(2e-4 * 0.5**0.9, rel=1e-6)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_backbone_starts_from_an_official_classification_checkpoint(tmp_path):
    from metaformer import create_model
    from metaformer.weights import to_official_keys

    classifier = create_model("poolformer_s12", num_classes=10, **TINY)
    torch.save({"state_dict": to_official_keys(classifier.state_dict())}, tmp_path / "official.pth.tar")
    config = SegmenterConfig(num_classes=2, backbone_overrides=TINY, fpn_channels=16, head_channels=8)
    model = create_segmenter(config, backbone_checkpoint=tmp_path / "official.pth.tar")
    body = model.neck.body
    assert torch.equal(body.stem.conv.weight, classifier.stem.conv.weight)
    assert torch.equal(body.stages[3].blocks[0].mlp.fc2.weight, classifier.stages[3].blocks[0].mlp.fc2.weight)
    assert torch.equal(body.out_norms[0].weight, torch.ones(8))  # the new output norms start at 1 / 0


def test_shapes_recipe_defaults_yield_to_the_users_flags():
    shapes = SegmentTrainConfig().resolve()
    narrow = (32, 64, 160, 256)
    assert (shapes.amp, shapes.dropout, dict(shapes.model_kwargs)) == (
        "off",
        0.0,
        {"depths": (1, 1, 3, 1), "dims": narrow, "layer_scale_init": None},
    )
    mine = SegmentTrainConfig(amp="bf16", dropout=0.2, model_kwargs={"layer_scale_init": 1e-5}).resolve()
    assert (mine.amp, mine.dropout, dict(mine.model_kwargs)) == (
        "bf16",
        0.2,
        {"depths": (1, 1, 3, 1), "dims": narrow, "layer_scale_init": 1e-5},
    )
    paper = SegmentTrainConfig(data="ade").resolve()
    assert (paper.amp, paper.dropout, dict(paper.model_kwargs)) == ("off", 0.1, {})
    assert paper.segmenter_config(150).fpn_channels == 256


def test_class_weights_weigh_each_pixel_by_its_true_class():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, 0] = IGNORE_INDEX
    weight = torch.tensor([0.5, 1.0, 2.0])
    per_pixel = nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = target != IGNORE_INDEX
    w = weight[target.clamp(max=2)] * valid
    expected = (per_pixel * w).sum() / w.sum()
    assert torch.allclose(segmentation_loss(logits, target, class_weight=weight), expected, atol=1e-6)
    assert torch.allclose(
        segmentation_loss(logits, target, class_weight=torch.ones(3)), segmentation_loss(logits, target)
    )


def test_class_weights_come_from_the_recipe_and_are_checked():
    assert SegmentTrainConfig().resolve().class_weight is None
    assert SegmentTrainConfig(data="ade").resolve().class_weight is None
    assert SegmentTrainConfig(class_weight=[1, 2]).resolve().class_weight == (1.0, 2.0)
    with pytest.raises(ConfigError, match="non-negative with at least one positive"):
        SegmentTrainConfig(class_weight=[1, -1])
    with pytest.raises(ConfigError, match="gives 2 weights but the data set has 4 classes"):
        SegmentationTask(["a", "b", "c", "d"], SegAugment(), class_weight=[1, 2])

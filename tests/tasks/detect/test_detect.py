import math

import pytest
import torch
from torch import nn

from metaformer.errors import CheckpointError, ConfigError
from metaformer.tasks.dense.fpn import BackboneFPN, create_backbone
from metaformer.tasks.detect.coco_eval import coco_evaluate, coco_ground_truth, masks_to_rle, to_coco_results
from metaformer.tasks.detect.model import DetectorConfig, create_detector, load_detector, save_detector
from metaformer.tasks.detect.train import RECIPES, DetectionTask, DetectTrainConfig, make_scheduler

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


def _tiny(arch: str, **kw) -> nn.Module:
    config = DetectorConfig(num_classes=3, arch=arch, backbone_overrides=TINY, min_size=64, max_size=64, **kw)
    return create_detector(config)


def _batch():
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:30] = 1
    masks[1, 30:60, 35:60] = 1
    targets = [
        {
            "boxes": torch.tensor([[10.0, 8, 30, 40], [35, 30, 60, 60]]),
            "labels": torch.tensor([1, 3]),
            "masks": masks,
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": masks[:0]},
    ]
    return images, targets


def test_fpn_widths_come_from_feature_info_and_levels_match_the_official_configs():
    body = create_backbone("poolformer_s12", out_indices=(1, 2, 3), **TINY)
    retina = BackboneFPN(body, out_channels=16, extra="p6p7")
    assert [b[0].in_channels for b in retina.fpn.inner_blocks] == [
        16,
        32,
        64,
    ]  # stages 2-4, not typed by hand
    assert retina.fpn.extra_blocks.p6.in_channels == 64  # P6 from C5 ("on_input"), not from P5
    maps = retina(torch.rand(1, 3, 64, 64))
    assert list(maps) == ["0", "1", "2", "p6", "p7"]
    assert [m.shape[-1] for m in maps.values()] == [8, 4, 2, 1, 1]  # strides 8, 16, 32, 64, 128
    assert all(m.shape[1] == 16 for m in maps.values())
    assert isinstance(body.out_norms[0], nn.GroupNorm)  # every used output has its fresh norm
    mask_rcnn = BackboneFPN(create_backbone("poolformer_s12", **TINY), out_channels=16, extra="pool")
    maps = mask_rcnn(torch.rand(1, 3, 64, 64))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [m.shape[-1] for m in maps.values()] == [16, 8, 4, 2, 1]


def test_frozen_stages_freeze_stem_and_first_stages_and_keep_them_in_eval():
    neck = BackboneFPN(
        create_backbone("poolformer_s12", drop_path_rate=0.1, **TINY), extra="pool", frozen_stages=2
    )
    neck.train()
    assert not any(p.requires_grad for p in neck.body.stem.parameters())
    assert not any(p.requires_grad for p in neck.body.stages[1].parameters())
    assert all(p.requires_grad for p in neck.body.stages[2].parameters())
    assert not neck.body.stages[0].training and neck.body.stages[2].training
    with pytest.raises(ConfigError, match="frozen_stages must be in -1..4"):
        BackboneFPN(create_backbone("poolformer_s12", **TINY), frozen_stages=5)


@pytest.mark.parametrize("arch", ["retinanet", "maskrcnn"])
def test_forward_losses_and_one_training_step(arch):
    model = _tiny(arch, fpn_channels=16)
    images, targets = _batch()
    if arch == "retinanet":
        for t in targets:
            del t["masks"]
    task = DetectionTask(None, ["a", "b", "c"], [1, 2, 3], masks=arch == "maskrcnn")
    model.train()
    losses = model(images, targets)
    expected = {"classification", "bbox_regression"} if arch == "retinanet" else {
        "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}  # fmt: skip
    assert set(losses) == expected and all(math.isfinite(v.item()) for v in losses.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.named_parameters()}
    loss, n = task.train_step(model, (images, targets))
    loss.backward()
    optimizer.step()
    assert n == 2
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.body.stem") for k in changed) and any(
        k.startswith("head") or "heads" in k for k in changed
    )
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[-1] == 4
    if arch == "maskrcnn":
        assert out[0]["masks"].shape[1:] == (1, 64, 64)


def _ground_truth():
    images = [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 64},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
    ]
    boxes = {1: [[4, 4, 20, 30], [30, 10, 25, 25]], 2: [[10, 12, 40, 40]]}
    anns = []
    for image_id, image_boxes in boxes.items():
        for x, y, w, h in image_boxes:
            mask = torch.zeros(1, 64, 64)
            mask[0, y : y + h, x : x + w] = 1
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 5 if len(anns) % 2 else 9,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": masks_to_rle(mask[None])[0],
                }
            )
    return coco_ground_truth(
        {
            "images": images,
            "annotations": anns,
            "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}],
        }
    )


def test_coco_evaluation_of_perfect_predictions_is_one_and_wrong_classes_zero():
    gt = _ground_truth()
    perfect = [dict(a, score=0.9) for a in gt.dataset["annotations"]]
    metrics = coco_evaluate(gt, perfect, iou_types=("bbox", "segm"))
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50"):
        assert metrics[key] == pytest.approx(1.0)
    assert metrics["bbox_APs"] == pytest.approx(1.0) and metrics["bbox_APm"] == pytest.approx(1.0)
    assert metrics["bbox_APl"] == 0.0  # no large objects: COCOeval's -1 is reported as 0
    swapped = [dict(a, score=0.9, category_id=14 - a["category_id"]) for a in gt.dataset["annotations"]]
    assert coco_evaluate(gt, swapped)["bbox_AP"] == 0.0
    assert coco_evaluate(gt, [])["bbox_AP50"] == 0.0
    half = coco_evaluate(gt, perfect[:1] + perfect[2:], image_ids=[1])  # image 1 only, one of its two boxes
    assert half["bbox_AP"] == pytest.approx(0.5, abs=0.01)


def test_to_coco_results_maps_labels_to_category_ids_and_xywh():
    out = {
        "boxes": torch.tensor([[4.0, 4, 24, 34]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([2]),
    }
    (result,) = to_coco_results([out], [7], cat_ids=[5, 9])
    assert result == {"image_id": 7, "category_id": 9, "bbox": [4.0, 4.0, 20.0, 30.0], "score": 0.8}


def test_detector_weights_round_trip_and_wrong_task_is_refused(tmp_path):
    model = _tiny("retinanet", fpn_channels=16, head_norm=True, anchor_sizes=(16, 32, 64, 128, 256))
    save_detector(model, tmp_path / "det.safetensors", class_names=["a", "b", "c"], cat_ids=[4, 5, 6])
    loaded, names, cat_ids = load_detector(tmp_path / "det.safetensors")
    assert names == ["a", "b", "c"] and cat_ids == [4, 5, 6]
    assert loaded.detector_config == model.detector_config
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    from metaformer.weights import save_weights

    save_weights(create_backbone("poolformer_s12", **TINY), tmp_path / "backbone.safetensors")
    with pytest.raises(CheckpointError, match="not a detector checkpoint"):
        load_detector(tmp_path / "backbone.safetensors")


def test_step_schedule_warms_up_then_decays_at_the_given_epochs():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = make_scheduler(
        opt, sched="step", lr=1e-4, total_updates=120, updates_per_epoch=10, lr_steps=(8, 11), warmup_iters=5
    )
    lrs = []
    for step in range(1, 121):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] < 1e-4 / 2 and lrs[10] == pytest.approx(1e-4)
    assert lrs[85] == pytest.approx(1e-5) and lrs[115] == pytest.approx(1e-6)


def test_shapes_recipe_backbone_overrides_merge_under_the_users():
    recipe = RECIPES["shapes"]["model_kwargs"]
    assert dict(DetectTrainConfig().resolve().model_kwargs) == recipe
    mine = DetectTrainConfig(model_kwargs={"depths": (1, 1, 1, 1)}).resolve()
    assert dict(mine.model_kwargs) == {**recipe, "depths": (1, 1, 1, 1)}
    assert dict(DetectTrainConfig(data="coco").resolve().model_kwargs) == {}

"""`metaformer detect` and `metaformer segment` end to end on a tiny generated shapes set, and bad inputs."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from metaformer.cli import main
from metaformer.data.shapes import ShapesConfig, make_shapes

TINY = '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}'
DETECT = [
    "--model-kwargs",
    TINY,
    "--batch-size",
    "2",
    "--min-size",
    "64",
    "--max-size",
    "64",
    "--fpn-channels",
    "16",
]
DETECT += ["--train-split", "train", "--val-split", "val", "--workers", "0", "--recipe", "shapes"]
SEGMENT = ["--model-kwargs", TINY, "--batch-size", "2", "--crop-size", "64", "--scale", "256", "64"]
SEGMENT += ["--fpn-channels", "16", "--head-channels", "8", "--workers", "0", "--recipe", "shapes"]
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "last.pt",
    "last.safetensors",
    "best.safetensors",
)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(
        tmp_path_factory.mktemp("data"), ShapesConfig(num_train=4, num_val=2, img_size=64, seed=5)
    )


@pytest.fixture(scope="module")
def detect_run(shapes, tmp_path_factory):
    """Two epochs of a tiny RetinaNet, interrupted after the first and resumed."""
    out = tmp_path_factory.mktemp("detect") / "run"
    args = ["detect", "train", "--data", str(shapes), "--output", str(out), "--epochs", "2", *DETECT]
    assert main([*args, "--stop-after-epoch", "1"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert main([*args, "--resume"]) == 0
    return out


@pytest.fixture(scope="module")
def segment_run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("segment") / "run"
    assert (
        main(["segment", "train", "--data", str(shapes), "--output", str(out), "--epochs", "1", *SEGMENT])
        == 0
    )
    return out


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("metaformer: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_detect_train_writes_the_run_folder_and_resumes(detect_run):
    for name in (*RUN_FILES, "curves.png"):
        assert (detect_run / name).is_file(), name
    records = [json.loads(line) for line in (detect_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl"} <= set(records[-1])
    summary = json.loads((detect_run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["world_size"] == 1 and summary["arch"] == "retinanet"
    config = json.loads((detect_run / "config.json").read_text())
    assert config["class_names"] == ["circle", "rectangle", "triangle"] and config["head_norm"] is True


BBOX_KEYS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl")


def _last_record(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_detect_eval_and_predict(detect_run, shapes, tmp_path, capsys):
    checkpoint = str(detect_run / "last.safetensors")
    results = tmp_path / "results.json"
    args = ["detect", "eval", "--checkpoint", checkpoint, "--data", str(shapes), "--split", "val"]
    assert main([*args, "--results", str(results), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2
    logged = _last_record(detect_run)  # the last epoch evaluated the same weights on the same images
    assert {key: metrics[key] for key in BBOX_KEYS} == pytest.approx({key: logged[key] for key in BBOX_KEYS})
    assert isinstance(json.loads(results.read_text()), list)
    out = tmp_path / "pred"
    args = ["detect", "predict", str(shapes / "images/val"), "--checkpoint", checkpoint, "--output", str(out)]
    assert main([*args, "--score-thresh", "0", "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    drawn = Image.open(out / "000000.png")
    assert drawn.size == (64, 64) and drawn.mode == "RGB"
    detections = json.loads((out / "detections.json").read_text())
    # a threshold of 0 keeps every detection the model makes (up to its 100 per image), however unsure
    assert detections and len(detections) == reported["detections"]
    categories = {
        c["id"] for c in json.loads((shapes / "annotations/instances_val.json").read_text())["categories"]
    }
    for detection in detections:
        x, y, w, h = detection["bbox"]
        assert detection["image_id"] in (1, 2) and detection["category_id"] in categories
        assert 0 <= detection["score"] <= 1 and w >= 0 and h >= 0 and 0 <= x <= 64 and 0 <= y <= 64
    assert max(sum(d["image_id"] == i for d in detections) for i in (1, 2)) <= 100


def test_detect_eval_ap_equals_pycocotools_on_the_written_results(detect_run, shapes, tmp_path, capsys):
    """A checkpoint whose detections clear COCO evaluation's 0.05 score cut (its class logits' bias raised:
    the briefly trained one scores everything near the 0.01 prior), evaluated by the CLI and by
    pycocotools' COCOeval directly on the results file the CLI wrote."""
    import contextlib
    import io

    import torch
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from metaformer.tasks.detect.model import load_detector, save_detector

    model, names, cat_ids = load_detector(detect_run / "last.safetensors")
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.add_(3.0)
    save_detector(model, tmp_path / "confident.safetensors", class_names=names, cat_ids=cat_ids)
    results = tmp_path / "results.json"
    args = ["detect", "eval", "--checkpoint", str(tmp_path / "confident.safetensors"), "--data", str(shapes)]
    assert main([*args, "--split", "val", "--results", str(results), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    detections = json.loads(results.read_text())
    assert detections
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(shapes / "annotations/instances_val.json"))
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert metrics["bbox_AP"] == pytest.approx(evaluation.stats[0])
    assert metrics["bbox_AP50"] == pytest.approx(evaluation.stats[1])
    assert metrics["bbox_AP50"] > 0  # some of the boxes do find the shapes


def test_mask_rcnn_trains_and_reports_segm_ap(shapes, tmp_path):
    out = tmp_path / "mask"
    args = [
        "detect",
        "train",
        "--data",
        str(shapes),
        "--output",
        str(out),
        "--arch",
        "maskrcnn",
        *DETECT,
        "--no-head-norm",
    ]
    assert (
        main([*args, "--epochs", "1", "--anchor-sizes", "16", "32", "64", "128", "256", "--no-head-norm"])
        == 0
    )
    record = json.loads((out / "metrics.jsonl").read_text())
    assert "segm_AP" in record and "bbox_AP" in record


def test_segment_train_eval_predict(segment_run, shapes, tmp_path, capsys):
    for name in RUN_FILES:
        assert (segment_run / name).is_file(), name
    summary = json.loads((segment_run / "summary.json").read_text())
    assert set(summary["per_class_IoU"]) == {"background", "circle", "rectangle", "triangle"}
    checkpoint = str(segment_run / "best.safetensors")
    assert main(["segment", "eval", "--checkpoint", checkpoint, "--data", str(shapes), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2
    logged = _last_record(segment_run)  # the run's own evaluation of the same weights
    for key in ("mIoU", "mAcc", "pixel_acc"):
        assert metrics[key] == pytest.approx(logged[key]), key
    assert metrics["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    out = tmp_path / "pred"
    images = sorted((shapes / "images/val").glob("*.png"))
    for image in images:
        assert main(["segment", "predict", str(image), "--checkpoint", checkpoint, "--output", str(out)]) == 0
    assert Image.open(out / "000001_overlay.png").size == (64, 64)
    # mIoU counted again from the predicted label maps and the masks (mmseg's rule: a class in neither
    # has no IoU): the same number eval reported
    intersection, union = np.zeros(4), np.zeros(4)
    for image in images:
        labels = np.asarray(Image.open(out / f"{image.stem}_labels.png")).astype(int)
        truth = np.asarray(Image.open(shapes / "masks/val" / image.name)).astype(int)
        assert labels.shape == truth.shape == (64, 64) and labels.max() < 4
        for c in range(4):
            intersection[c] += ((labels == c) & (truth == c)).sum()
            union[c] += ((labels == c) | (truth == c)).sum()
    assert metrics["mIoU"] == pytest.approx((intersection[union > 0] / union[union > 0]).mean())
    assert 0 < metrics["mIoU"] < 1


# --------------------------------------------------------------------------- bad input
def _coco_copy(shapes, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(shapes / "images", root / "images")
    shutil.copytree(shapes / "annotations", root / "annotations")
    return root


def _train_detect(root, tmp_path):
    return main(
        ["detect", "train", "--data", str(root), "--output", str(tmp_path / "out"), "--epochs", "1", *DETECT]
    )


def test_malformed_json_fails_in_one_line_without_traceback(shapes, tmp_path):
    root = _coco_copy(shapes, tmp_path)
    (root / "annotations/instances_train.json").write_text('{"images": [1, 2,')
    args = [sys.executable, "-m", "metaformer", "detect", "train", "--data", str(root), *DETECT]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "instances_train.json is not valid JSON" in proc.stderr.strip().splitlines()[-1]


def test_annotation_of_a_missing_image_is_refused(shapes, tmp_path, capsys):
    root = _coco_copy(shapes, tmp_path)
    path = root / "annotations/instances_val.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["image_id"] = 404
    path.write_text(json.dumps(data))
    assert _train_detect(root, tmp_path) == 1
    assert "references image id 404, which is not in 'images'" in _error(capsys)


def test_empty_data_set_is_refused(shapes, tmp_path, capsys):
    root = _coco_copy(shapes, tmp_path)
    path = root / "annotations/instances_train.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "images": [], "annotations": []}))
    assert _train_detect(root, tmp_path) == 1
    assert "the data set is empty" in _error(capsys)


def test_zero_and_negative_boxes_are_skipped_and_counted(detect_run, shapes, tmp_path, capsys):
    root = _coco_copy(shapes, tmp_path)
    path = root / "annotations/instances_val.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["bbox"][2] = 0
    data["annotations"][1]["bbox"][3] = -5
    path.write_text(json.dumps(data))
    args = ["detect", "eval", "--checkpoint", str(detect_run / "best.safetensors"), "--data", str(root)]
    assert main([*args, "--split", "val", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped_boxes"] == 2
    assert "skipped 2 box(es) of zero or negative width or height" in captured.err


def test_detector_checkpoint_with_another_class_count_is_refused(detect_run, shapes, tmp_path, capsys):
    root = _coco_copy(shapes, tmp_path)
    path = root / "annotations/instances_val.json"
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][:2]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] <= 2]
    path.write_text(json.dumps(data))
    args = ["detect", "eval", "--checkpoint", str(detect_run / "best.safetensors"), "--data", str(root)]
    assert main([*args, "--split", "val"]) == 1
    assert "was trained for 3 classes but" in _error(capsys)


def test_mask_value_beyond_the_class_list_is_refused(shapes, tmp_path, capsys):
    root = tmp_path / "seg"
    shutil.copytree(shapes / "images", root / "images")
    shutil.copytree(shapes / "masks", root / "masks")
    (root / "classes.txt").write_text("background\ncircle\nrectangle\ntriangle\n")
    mask = np.asarray(Image.open(root / "masks/train/000001.png")).copy()
    mask[0, 0] = 9
    Image.fromarray(mask).save(root / "masks/train/000001.png")
    args = [
        "segment",
        "train",
        "--data",
        str(root),
        "--output",
        str(tmp_path / "out"),
        "--epochs",
        "1",
        *SEGMENT,
    ]
    assert main(args) == 1
    assert "000001.png has value 9 but the class list has 4 classes" in _error(capsys)


def test_segmenter_checkpoint_with_another_class_count_is_refused(segment_run, shapes, tmp_path, capsys):
    root = tmp_path / "seg"
    shutil.copytree(shapes / "images", root / "images")
    shutil.copytree(shapes / "masks", root / "masks")
    (root / "classes.txt").write_text("background\ncircle\nrectangle\ntriangle\nstar\n")
    args = ["segment", "eval", "--checkpoint", str(segment_run / "best.safetensors"), "--data", str(root)]
    assert main(args) == 1
    assert "was trained for 4 classes but" in _error(capsys)


def test_class_weights_that_do_not_fit_the_classes_are_refused(shapes, tmp_path, capsys):
    args = ["segment", "train", "--data", str(shapes), "--output", str(tmp_path / "out"), "--epochs", "1"]
    assert main([*args, *SEGMENT, "--class-weight", "1", "2"]) == 1
    assert "--class-weight gives 2 weights but the data set has 4 classes" in _error(capsys)

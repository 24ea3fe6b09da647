import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from metaformer.data.coco import CocoDetection, coco_split, collate_detection
from metaformer.errors import DataError


def _write_set(root, annotations, images=None, categories=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}]
    for info in images:
        Image.fromarray(np.full((24, 32, 3), 128, np.uint8)).save(root / "images" / info["file_name"])
    data = {
        "images": images,
        "annotations": annotations,
        "categories": categories or [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return root / "images", path


def _square_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_boxes_labels_and_polygon_and_rle_masks(tmp_path):
    rle_mask = np.zeros((24, 32), np.uint8)
    rle_mask[2:6, 20:30] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 8, 10], "segmentation": _square_polygon(4, 4, 12, 14)},  # noqa: E501
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 2, 10, 4],
         "segmentation": {"size": [24, 32], "counts": rle["counts"].decode()}},
    ]  # fmt: skip
    ds = CocoDetection(*_write_set(tmp_path, anns), masks=True)
    image, target = ds[0]
    assert image.shape == (3, 24, 32) and 0 <= image.min() and image.max() <= 1
    assert ds.class_names == ["dog", "cat"]  # sorted by category id: dog (3) is label 1
    assert target["labels"].tolist() == [2, 1]
    assert torch.equal(target["boxes"], torch.tensor([[4.0, 4, 12, 14], [20, 2, 30, 6]]))
    assert target["masks"].shape == (2, 24, 32)
    assert torch.equal(target["masks"][1], torch.from_numpy(rle_mask))
    assert target["masks"][0][5:13, 5:11].all() and target["masks"][0].sum() < 11 * 9 + 1


def test_horizontal_flip_moves_boxes_with_masks(tmp_path):
    anns = [
        {
            "id": 1,
            "image_id": 1,
            "category_id": 7,
            "bbox": [2, 3, 6, 5],
            "segmentation": _square_polygon(2, 3, 8, 8),
        }
    ]
    ds = CocoDetection(*_write_set(tmp_path, anns), masks=True, train=True)
    flipped = [t for _, t in (ds[0] for _ in range(20)) if t["boxes"][0, 0] > 16]
    assert flipped, "no flip in 20 draws"
    box = flipped[0]["boxes"][0]
    assert box.tolist() == [24.0, 3.0, 30.0, 8.0]
    ys, xs = torch.nonzero(flipped[0]["masks"][0], as_tuple=True)
    assert xs.min() >= 23 and xs.max() <= 30


def test_zero_and_negative_size_boxes_are_skipped_and_counted(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 8, 10]},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [4, 4, 0, 10]},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [4, 4, 5, -1]},
    ]
    ds = CocoDetection(*_write_set(tmp_path, anns))
    assert ds.skipped_boxes == 2
    assert ds[0][1]["boxes"].shape == (1, 4)


def test_malformed_json_is_one_sentence(tmp_path):
    images, path = _write_set(tmp_path, [])
    path.write_text('{"images": [}')
    with pytest.raises(DataError, match=r"not valid JSON .*line 1, column 13"):
        CocoDetection(images, path)


def test_annotation_for_a_missing_image_is_refused(tmp_path):
    anns = [{"id": 5, "image_id": 99, "category_id": 7, "bbox": [0, 0, 4, 4]}]
    with pytest.raises(DataError, match="annotation 5 .* references image id 99"):
        CocoDetection(*_write_set(tmp_path, anns))


def test_empty_data_set_is_refused(tmp_path):
    with pytest.raises(DataError, match="no images; the data set is empty"):
        CocoDetection(*_write_set(tmp_path, [], images=[]))
    with pytest.raises(DataError, match="no annotated images"):
        CocoDetection(*_write_set(tmp_path, []), drop_empty=True)


def test_image_file_missing_on_disk_is_named(tmp_path):
    images, path = _write_set(tmp_path, [])
    (images / "a.png").unlink()
    with pytest.raises(DataError, match=r"missing from .*\(first: a.png\)"):
        CocoDetection(images, path)


def test_coco_split_finds_both_layouts_and_collate_keeps_lists(tmp_path):
    (tmp_path / "val2017").mkdir()
    assert coco_split(tmp_path, "val2017") == (
        tmp_path / "val2017",
        tmp_path / "annotations/instances_val2017.json",
    )
    (tmp_path / "images/train").mkdir(parents=True)
    assert coco_split(tmp_path, "train")[0] == tmp_path / "images/train"
    with pytest.raises(DataError, match="no image folder for split 'test'"):
        coco_split(tmp_path, "test")
    images, targets = collate_detection([(torch.zeros(3, 4, 4), {"a": 1}), (torch.zeros(3, 5, 6), {"a": 2})])
    assert [i.shape[-1] for i in images] == [4, 6] and [t["a"] for t in targets] == [1, 2]

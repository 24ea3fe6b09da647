import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from metaformer.data.shapes import SEGMENTATION_CLASSES, SHAPE_CLASSES, ShapesConfig, make_shapes
from metaformer.errors import ConfigError

TINY = ShapesConfig(num_train=4, num_val=2, img_size=64, seed=3)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), TINY)


def test_same_seed_gives_identical_files(shapes_dir, tmp_path):
    again = make_shapes(tmp_path, TINY)
    for rel in ("images/train/000000.png", "masks/val/000001.png", "annotations/instances_train.json"):
        assert (again / rel).read_bytes() == (shapes_dir / rel).read_bytes()
    other = make_shapes(tmp_path, ShapesConfig(num_train=4, num_val=2, img_size=64, seed=4))
    assert other != again
    assert (other / "images/train/000000.png").read_bytes() != (
        again / "images/train/000000.png"
    ).read_bytes()


def test_existing_set_is_reused_not_rewritten(shapes_dir):
    before = (shapes_dir / "annotations/instances_train.json").stat().st_mtime_ns
    assert make_shapes(shapes_dir.parent, TINY) == shapes_dir
    assert (shapes_dir / "annotations/instances_train.json").stat().st_mtime_ns == before
    assert not [
        p for p in shapes_dir.parent.iterdir() if p.name.startswith(".shapes-")
    ]  # no temp folder left


def test_coco_annotations_agree_with_the_instance_and_class_pngs(shapes_dir):
    coco = json.loads((shapes_dir / "annotations/instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(SHAPE_CLASSES)
    assert len(coco["images"]) == TINY.num_train
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in coco["images"]:
        instances = np.asarray(Image.open(shapes_dir / "instances/train" / image["file_name"]))
        classes = np.asarray(Image.open(shapes_dir / "masks/train" / image["file_name"]))
        anns = by_image[image["id"]]
        assert instances.max() == len(anns) >= TINY.min_objects
        for k, ann in enumerate(anns):
            decoded = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert np.array_equal(decoded, instances == k + 1)
            assert ann["area"] == decoded.sum()
            ys, xs = np.nonzero(decoded)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.all(classes[decoded] == ann["category_id"])
        assert np.all(classes[instances == 0] == 0)
    names = (shapes_dir / "classes.txt").read_text().split()
    assert tuple(names) == SEGMENTATION_CLASSES


def test_invalid_config_is_refused():
    with pytest.raises(ConfigError, match="min_objects"):
        ShapesConfig(min_objects=3, max_objects=2)
    with pytest.raises(ConfigError, match="img_size"):
        ShapesConfig(img_size=16)

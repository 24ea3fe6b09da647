import numpy as np
import pytest
import torch
from PIL import Image

from metaformer.data.segmentation import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    SegAugment,
    detect_layout,
    eval_resize,
    open_segmentation,
    train_transform,
)
from metaformer.errors import DataError


def _write(root, split, masks, *, ann_dir="masks", classes=None, size=(20, 30)):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / ann_dir / split).mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        Image.fromarray(np.full((*size, 3), 20 * i, np.uint8)).save(root / "images" / split / f"{i:03d}.jpg")
        Image.fromarray(mask.astype(np.uint8)).save(root / ann_dir / split / f"{i:03d}.png")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_ade20k_layout_reduces_zero_label(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[:, 10:20] = 1
    mask[:, 20:] = 150
    _write(tmp_path, "validation", [mask], ann_dir="annotations")
    assert detect_layout(tmp_path) == "ade20k"
    ds = open_segmentation(tmp_path)  # auto layout, validation split by default
    assert ds.class_names == list(ADE20K_CLASSES) and ds.num_classes == 150
    image, labels = ds[0]
    assert image.shape == (3, 512, 768)  # keep-ratio resize to short side 512, multiple of 32
    assert labels.shape == (20, 30)  # the mask stays at its original size for evaluation
    assert set(labels[:, :10].unique().tolist()) == {IGNORE_INDEX}
    assert set(labels[:, 10:20].unique().tolist()) == {0}
    assert set(labels[:, 20:].unique().tolist()) == {149}


def test_ade20k_value_beyond_150_is_refused(tmp_path):
    mask = np.full((20, 30), 151, np.uint8)
    _write(tmp_path, "training", [mask], ann_dir="annotations")
    with pytest.raises(DataError, match=r"000.png has value 151 but the class list has 150 classes"):
        open_segmentation(tmp_path, "training")


def test_folder_layout_mask_value_beyond_class_list_is_refused(tmp_path):
    good = np.zeros((20, 30), np.uint8)
    good[5:, :] = 2
    good[0, 0] = IGNORE_INDEX
    bad = good.copy()
    bad[3, 3] = 3
    _write(tmp_path, "train", [good, bad], classes=["bg", "a", "b"])
    with pytest.raises(
        DataError, match=r"001.png has value 3 but the class list has 3 classes, so values must be 0..2"
    ):
        open_segmentation(tmp_path, "train", layout="folder")
    ds = open_segmentation(tmp_path, "train", classes=["bg", "a", "b", "c"])
    assert ds[1][1][3, 3] == 3 and ds[0][1][0, 0] == IGNORE_INDEX


def test_stray_value_past_the_up_front_check_fails_when_loaded(tmp_path):
    masks = [np.zeros((20, 30), np.uint8) for _ in range(10)]
    masks[9][0, 0] = 7
    _write(tmp_path, "train", masks, classes=["bg", "fg"])
    ds = open_segmentation(tmp_path, "train")  # only the first 8 masks are read up front
    with pytest.raises(DataError, match="009.png has value 7"):
        ds[9]


def test_missing_mask_empty_split_and_missing_class_list_are_refused(tmp_path):
    _write(tmp_path, "train", [np.zeros((20, 30), np.uint8)], classes=["bg"])
    (tmp_path / "images/train/extra.jpg").write_bytes((tmp_path / "images/train/000.jpg").read_bytes())
    with pytest.raises(DataError, match=r"have no mask .*\(first: extra.jpg\)"):
        open_segmentation(tmp_path, "train")
    (tmp_path / "images/val").mkdir()
    (tmp_path / "masks/val").mkdir()
    with pytest.raises(DataError, match="no images in .*empty"):
        open_segmentation(tmp_path, "val")
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DataError, match="class list .*classes.txt does not exist"):
        open_segmentation(tmp_path, "train")


def test_train_transform_crops_pads_with_ignore_and_is_seeded():
    aug = SegAugment(scale=(64, 32), ratio_range=(0.5, 1.0), crop_size=(48, 48))
    image = torch.rand(3, 20, 40)
    mask = torch.randint(0, 3, (20, 40))
    torch.manual_seed(1)
    x1, y1 = train_transform(image, mask, aug)
    torch.manual_seed(1)
    x2, y2 = train_transform(image, mask, aug)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (3, 48, 48) and y1.shape == (48, 48)
    # the rescaled image is at most 32 px high, so rows past it are padding: 0 in the image, ignore in the mask  # noqa: E501
    assert (y1[32:] == IGNORE_INDEX).all() and (x1[:, 32:] == 0).all()
    assert eval_resize(image, SegAugment(scale=(2048, 50))).shape == (3, 64, 128)  # 50x100 -> multiples of 32

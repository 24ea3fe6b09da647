from pathlib import Path

import pytest
from PIL import Image

from metaformer.data.folders import check_layout, folder_split, folder_splits, stratified_split
from metaformer.errors import DataError


def _tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return root


def test_splits_share_the_train_class_indices(tmp_path):
    root = _tree(tmp_path, {"train": {"cat": 2, "dog": 2, "eel": 1}, "val": {"dog": 1, "eel": 1}})
    train, val = folder_splits(root)
    assert train.classes == val.classes == ["cat", "dog", "eel"]
    assert sorted(val.targets) == [1, 2]


def test_a_few_corrupt_images_are_skipped_and_counted(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 3}, "val": {"a": 1}})
    (root / "train" / "a" / "broken.jpg").write_bytes(b"not an image at all")
    (root / "train" / "a" / "notes.txt").write_text("ignored: not an image extension")
    train, _ = folder_splits(root)
    assert len(train) == 3
    assert [Path(p).name for p in train.skipped] == ["broken.jpg"]
    image, label = train[0]
    assert image.size == (8, 8) and label == 0


def test_only_corrupt_images_is_a_data_error(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 0}, "val": {"a": 1}})
    (root / "train" / "a" / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"no usable images \(all 1 image files are unreadable\)"):
        folder_splits(root)


def test_missing_folder_and_missing_splits_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist; expected DIR/train/<class>"):
        check_layout(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        check_layout(tmp_path)
    (tmp_path / "train" / "a").mkdir()
    assert check_layout(tmp_path) == tmp_path  # no val/: a part of train/ is held out
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="'.*val' has no class folders"):
        check_layout(tmp_path)
    (tmp_path / "train" / "a").rename(tmp_path / "a")
    (tmp_path / "train").rmdir()
    (tmp_path / "val" / "a").mkdir()
    with pytest.raises(DataError, match="has a 'val' folder but no 'train' folder"):
        check_layout(tmp_path)


def test_val_class_unknown_to_train_is_refused(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 1}, "val": {"a": 1, "zebra": 1}})
    with pytest.raises(DataError, match="zebra"):
        folder_splits(root)


def test_single_split_with_fixed_classes(tmp_path):
    root = _tree(tmp_path, {"val": {"b": 1}})
    val = folder_split(root, "val", classes=["a", "b"])
    assert val.targets == [1]


@pytest.mark.parametrize("nested", [True, False])
def test_a_folder_without_val_is_split_stratified_and_seeded(tmp_path, nested):
    classes = {"ant": 20, "bee": 10, "cow": 3, "dot": 1}
    root = _tree(tmp_path, {"train": classes} if nested else {".": classes})
    train, val = folder_splits(root, train_transform=lambda im: "train", val_transform=lambda im: "val")
    assert train.classes == val.classes == ["ant", "bee", "cow", "dot"]
    held = {name: val.targets.count(i) for i, name in enumerate(val.classes)}
    assert held == {"ant": 2, "bee": 1, "cow": 1, "dot": 0}  # 10% of each class, one at least, never all
    assert len(train) + len(val) == 34
    assert train[0][0] == "train" and val[0][0] == "val"  # each side with its own transform
    files = {train.base.samples[i][0] for i in train.indices}
    assert files.isdisjoint(val.base.samples[i][0] for i in val.indices)
    again = folder_splits(root, val_split=0.1)[1]
    assert again.indices == val.indices
    assert len(folder_splits(root, val_split=0.5)[1]) == 10 + 5 + 2


def test_stratified_split_is_seeded_and_refuses_nothing_to_hold_out(tmp_path):
    targets = [0] * 50 + [1] * 50
    assert stratified_split(targets, 0.2) == stratified_split(targets, 0.2)
    assert stratified_split(targets, 0.2) != stratified_split(targets, 0.2, seed=1)
    root = _tree(tmp_path, {".": {"a": 1, "b": 1}})
    with pytest.raises(DataError, match="too few images to hold 0.1 of each class out"):
        folder_splits(root)

from pathlib import Path

from PIL import Image

from metaformer.data.sources import classification_splits


def _tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return root


def test_no_data_is_the_embedded_digits_split_alike_for_every_caller():
    train, val = classification_splits(None, img_size=16, val_split=0.1)
    again = classification_splits(None, img_size=16, val_split=0.1, only="val")[1]
    assert (len(train), len(val)) == (1437, 360) and val.classes == [str(i) for i in range(10)]
    assert [again[i][1] for i in range(20)] == [val[i][1] for i in range(20)]


def test_val_only_reads_val_with_the_checkpoints_class_order(tmp_path):
    root = _tree(tmp_path, {"val": {"dog": 1, "cat": 2}})  # no train/: evaluation still works
    train, val = classification_splits(root, img_size=8, val_split=0.1, only="val", classes=["dog", "cat"])
    assert train is None and val.classes == ["dog", "cat"] and sorted(val.targets) == [0, 1, 1]


def test_train_only_reads_train_and_a_tree_without_splits_is_held_out_alike(tmp_path):
    split = _tree(tmp_path / "split", {"train": {"a": 2, "b": 2}, "val": {"a": 1}})
    train, val = classification_splits(split, img_size=8, val_split=0.1, only="train")
    assert val is None and len(train) == 4
    flat = _tree(tmp_path / "flat", {"": {"a": 4, "b": 4}})
    both = classification_splits(flat, img_size=8, val_split=0.25)
    train_only = classification_splits(flat, img_size=8, val_split=0.25, only="train")
    val_only = classification_splits(flat, img_size=8, val_split=0.25, only="val")
    assert both[0].indices == train_only[0].indices and both[1].indices == val_only[1].indices
    assert len(both[0]) == 6 and len(both[1]) == 2

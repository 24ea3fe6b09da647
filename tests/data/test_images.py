"""data/images.py: the images a predict command line names, and reading one."""

import pytest
from PIL import Image

from metaformer.data.images import image_paths, open_rgb
from metaformer.errors import DataError


def _png(path, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (5, 4)).save(path)
    return path


def test_a_file_is_itself_and_a_folder_is_searched_recursively_in_order(tmp_path):
    b = _png(tmp_path / "b.png")
    a = _png(tmp_path / "sub" / "a.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert image_paths(b) == [b]
    assert image_paths(tmp_path) == sorted([a, b])


def test_missing_path_and_empty_folder_fail_in_one_sentence(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass an image file or a folder of images"):
        image_paths(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"holds no image files \(\.jpg, \.tif\); pass another path"):
        image_paths(tmp_path, extensions=(".jpg", ".tif"))


def test_open_rgb_converts_and_names_an_unreadable_file(tmp_path):
    image = open_rgb(_png(tmp_path / "grey.png", mode="L"))
    assert image.mode == "RGB" and image.size == (5, 4)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot read image '.*bad\.png' \(\w+\); pass a readable"):
        open_rgb(bad)


def test_the_image_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS as TORCHVISION

    from metaformer.data.images import IMG_EXTENSIONS

    assert IMG_EXTENSIONS == TORCHVISION

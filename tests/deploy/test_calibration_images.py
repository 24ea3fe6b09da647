"""int8 calibrates on the images asked for: every image of a set smaller than the limit, each once, and
``limit`` distinct images of a larger one; for classify (a folder, or the training data a run's
config.json names) and for segment (a folder, or the segmenter's training split)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer.data.segmentation import SegAugment, open_segmentation
from metaformer.data.shapes import SEGMENTATION_CLASSES, ShapesConfig, make_shapes
from metaformer.deploy.calibration import BATCH, calibration_set
from metaformer.tasks.dense.files import read_rgb
from metaformer.tasks.segment.deploy import calibration_images, calibration_view

MORE_THAN_A_BATCH = BATCH + 9  # 41 images: a second batch that must hold other images than the first


def numbered(index: int) -> np.ndarray:
    """A 4x4 RGB image whose red value names it."""
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[..., 0] = index
    return pixels


def number_of(image: torch.Tensor) -> int:
    return int(image[0, 0, 0])


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), np.uint8).copy()).permute(2, 0, 1).float()


def image_numbers(calibration) -> list[int]:
    return [number_of(torch.from_numpy(image)[0]) for image in calibration.images()]


def write_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(numbered(i)).save(root / f"{i:03d}.png")
    return root


def write_fashion_mnist(root: Path, count: int) -> Path:
    """The four IDX files, image i filled with the value i."""
    root.mkdir(parents=True)
    images = np.stack([np.full((28, 28), i, np.uint8) for i in range(count)])
    for prefix in ("train", "t10k"):
        header = (0x803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        labels = (np.arange(count) % 10).astype(np.uint8)
        header = (0x801).to_bytes(4, "big") + count.to_bytes(4, "big")
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    return root


# --------------------------------------------------------------------------- classify
@pytest.mark.parametrize("limit", [100, 30])
def test_classify_calibrates_on_the_folder_asked_for(tmp_path, limit):
    folder = write_folder(tmp_path / "calib", MORE_THAN_A_BATCH)
    numbers = image_numbers(calibration_set(None, folder, to_tensor, "eval", limit=limit))
    assert len(numbers) == min(limit, MORE_THAN_A_BATCH) == len(set(numbers))
    assert set(numbers) <= set(range(MORE_THAN_A_BATCH))


@pytest.mark.parametrize("limit", [100, 30])
def test_classify_calibrates_on_the_training_data_of_the_run(tmp_path, limit):
    data = write_fashion_mnist(tmp_path / "fm", MORE_THAN_A_BATCH)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"data": f"fashion-mnist:{data}"}))
    checkpoint = tmp_path / "run" / "best.safetensors"
    numbers = image_numbers(calibration_set(checkpoint, None, to_tensor, "eval", limit=limit))
    assert len(numbers) == min(limit, MORE_THAN_A_BATCH) == len(set(numbers))
    assert set(numbers) <= set(range(MORE_THAN_A_BATCH))


# --------------------------------------------------------------------------- segment
AUGMENT = SegAugment(scale=(128, 32), ratio_range=(1.0, 1.0), crop_size=(32, 32), photometric=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A shapes set whose training split holds more images than segment's calibration batch of 8."""
    config = ShapesConfig(num_train=20, num_val=1, img_size=32, max_objects=2)
    return make_shapes(tmp_path_factory.mktemp("shapes"), config)


def assert_each_once(calibration, expected: list[torch.Tensor]) -> None:
    """The calibration images are ``expected``, each exactly once (all distinct, as the test needs)."""
    assert all(not torch.equal(a, b) for i, a in enumerate(expected) for b in expected[:i])
    got = [torch.from_numpy(image)[0] for image in calibration.images()]
    matches = [[j for j, want in enumerate(expected) if torch.equal(image, want)] for image in got]
    assert all(len(m) == 1 for m in matches), "a calibration image is none of the asked-for ones"
    assert sorted(m[0] for m in matches) == list(range(len(expected)))


def test_segment_calibrates_on_each_training_image_once(shapes, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"data": str(shapes), "layout": "auto"}))
    paths = open_segmentation(shapes, train=True, augment=AUGMENT).images
    assert len(paths) == 20
    expected = [calibration_view(read_rgb(Path(p)), AUGMENT) for p in paths]
    calibration = calibration_images(
        tmp_path / "best.safetensors", None, AUGMENT, SEGMENTATION_CLASSES, ShapesConfig()
    )
    assert_each_once(calibration, expected)


def test_segment_calibrates_on_each_image_of_the_folder_once(shapes, tmp_path):
    folder = shapes / "images" / "train"
    paths = sorted(folder.iterdir())
    assert len(paths) == 20
    expected = [calibration_view(read_rgb(p), AUGMENT) for p in paths]
    calibration = calibration_images(tmp_path / "best.safetensors", folder, AUGMENT, [], ShapesConfig())
    assert_each_once(calibration, expected)


def test_segment_calibration_view_is_the_centre_of_the_eval_view():
    """Rotating an image by 180 degrees rotates its view: a centre crop (with even margins), not a
    corner's."""
    image = torch.rand(3, 32, 64)  # eval size 32x64 (no resize): margins 0 and 32 around the 32x32 crop
    view = calibration_view(image, AUGMENT)
    assert view.shape == (3, 32, 32)
    torch.testing.assert_close(
        calibration_view(image.flip(1, 2), AUGMENT), view.flip(1, 2), rtol=0, atol=1e-6
    )
    assert torch.equal(view, image[:, :, 16:48])

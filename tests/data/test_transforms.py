import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from metaformer.data.transforms import eval_transform, eval_transform_from_preprocessing, train_transform


def _find(transform, kind):
    return [t for t in transform.transforms if isinstance(t, kind)]


def test_paper_train_transform_is_timms_recipe():
    tf = train_transform(224, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="random")
    text = repr(tf)
    assert "RandAugment" in text and "n=2" in text  # two ops per image, as rand-m9 specifies
    erasing = _find(tf, RandomErasing)
    assert len(erasing) == 1 and erasing[0].probability == 0.25 and erasing[0].mode == "pixel"
    out = tf(Image.new("RGB", (300, 260), (120, 30, 200)))
    assert out.shape == (3, 224, 224)


def test_eval_transform_resizes_to_size_over_crop_pct_then_crops():
    tf = eval_transform(224, crop_pct=0.9)
    resize = _find(tf, T.Resize)[0]
    assert resize.size == 248 and resize.interpolation == T.InterpolationMode.BICUBIC
    assert _find(tf, T.CenterCrop)[0].size == (224, 224)
    assert tf(Image.new("RGB", (500, 375))).shape == (3, 224, 224)


def test_eval_transform_from_a_weights_record():
    tf = eval_transform_from_preprocessing(
        {"input_size": (3, 224, 224), "crop_pct": 0.95, "mean": (0, 0, 0), "std": (1, 1, 1)}
    )
    assert _find(tf, T.Resize)[0].size == 235  # M models: floor(224 / 0.95)
    out = tf(Image.new("RGB", (240, 240), (255, 255, 255)))
    assert torch.allclose(out, torch.ones_like(out))


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_eval_transform_of_an_rgb_image_equals_timms_value_for_value(interpolation):
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    for height, width in [(60, 50), (50, 60), (224, 224), (300, 171), (8, 5)]:
        image = Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))
        for size, crop_pct in [(32, 0.875), (32, 1.0), (224, 0.9), (224, 0.95), (28, 1.2)]:
            ours = eval_transform(size, crop_pct=crop_pct, interpolation=interpolation, mean=(0.5, 0.4, 0.3))
            timms = create_transform(
                size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=(0.5, 0.4, 0.3)
            )
            assert torch.equal(ours(image), timms(image)), (height, width, size, crop_pct)


def test_eval_transform_hands_other_inputs_to_timms_pipeline():
    from timm.data import create_transform

    tensor = torch.rand(3, 40, 50)
    timms = create_transform(32, is_training=False, crop_pct=0.9, interpolation="bicubic")
    assert torch.equal(eval_transform(32)(tensor), timms(tensor))

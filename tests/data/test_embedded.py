import numpy as np
import pytest
import torch

from metaformer.data.embedded import DIGITS_CLASSES, digits_splits, render_digits
from metaformer.errors import ConfigError


def test_digits_split_is_stratified_seeded_and_complete():
    train, val = digits_splits()
    assert (len(train), len(val)) == (1437, 360)
    assert train.classes == val.classes == list(DIGITS_CLASSES)
    counts = np.bincount(val.targets, minlength=10)
    totals = counts + np.bincount(train.targets, minlength=10)
    assert np.all(np.abs(counts - 0.2 * totals) <= 1)  # every class held out in proportion
    again_train, again_val = digits_splits()
    assert again_val.targets == val.targets and np.array_equal(again_val.images, val.images)


def test_rendered_digits_keep_the_original_scan():
    from sklearn.datasets import load_digits

    images, labels = render_digits(32)
    assert images.shape == (1797, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # grey repeated over RGB
    # averaging each 4x4 block back to 8x8 gives the scan (0..16 scaled to 0..255) closely
    pooled = images[..., 0].reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4))
    original = load_digits().images * 255 / 16
    corr = np.corrcoef(pooled.ravel(), original.ravel())[0, 1]
    assert corr > 0.97
    assert np.array_equal(labels, load_digits().target)


def test_items_go_through_the_transform():
    train, _ = digits_splits(48, train_transform=lambda im: torch.tensor(im.size))
    image, label = train[0]
    assert image.tolist() == [48, 48] and 0 <= label < 10


def test_bad_split_fraction_is_a_config_error():
    with pytest.raises(ConfigError, match="val_fraction"):
        digits_splits(val_fraction=1.5)

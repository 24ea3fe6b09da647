"""deploy.base: a MetaFormer folded wherever it sits in a model, and int8 agreement counted per pixel for
a segmenter's (B, K, H, W) logits, on the calibration set's held-out images only."""

import pytest
import torch

from metaformer import create_model
from metaformer.deploy.agreement import measure_agreement
from metaformer.deploy.base import check_int8, fold_inference, foldable
from metaformer.deploy.quantize import Calibration
from metaformer.models.fast import ChannelsLastInput
from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


def segmenter() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_segmenter(
        SegmenterConfig(3, backbone_overrides=TINY, fpn_channels=8, head_channels=8)
    ).eval()


def test_the_backbone_inside_a_segmenter_is_folded_and_the_outputs_kept():
    model = segmenter()
    assert foldable(model) and not foldable(torch.nn.Conv2d(3, 3, 1))
    fast = fold_inference(model)
    assert isinstance(fast.neck.body.stem, ChannelsLastInput)  # folded
    assert not isinstance(model.neck.body.stem, ChannelsLastInput)  # the input model is unchanged
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() <= 1e-5


def test_a_classifier_is_folded_whole():
    model = create_model("poolformer_s12", num_classes=4, **TINY).eval()
    assert isinstance(fold_inference(model).stem, ChannelsLastInput)


class Flip(torch.nn.Module):
    """The model's logits with the classes reversed on the left ``share`` of each row of pixels."""

    def __init__(self, model, share):
        super().__init__()
        self.model, self.share = model, share

    def forward(self, x):
        out = self.model(x).clone()
        cut = int(out.shape[-1] * self.share)
        out[..., :cut] = out[..., :cut].flip(1)
        return out


def test_int8_agreement_is_counted_per_pixel():
    model = segmenter()
    with torch.no_grad():
        model.head.classifier.bias.copy_(torch.tensor([5.0, 0.0, -5.0]))  # class 0 everywhere, flips to 2
    batches = [torch.rand(2, 3, 32, 32)]
    check = measure_agreement(Flip(model, 0.25), model, batches)
    assert check == {"agreement": pytest.approx(0.75), "images": 2, "unit": "pixel"}


class FlipHeldOut(torch.nn.Module):
    """The model's logits, with the classes reversed for the images whose first value is negative."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x).clone()
        flip = x[:, 0, 0, 0] < 0
        out[flip] = out[flip].flip(1)
        return out


def test_int8_agreement_is_measured_on_the_held_out_images_only():
    """12 images: 6 held out (a quarter, raised toward 100 but at most half the source). The runner is
    wrong exactly on the held-out images, so the check must read 0%; counting calibration images would not."""
    model = create_model("poolformer_s12", num_classes=4, **TINY).eval()
    images = torch.rand(12, 3, 32, 32)
    calibration = Calibration([images])
    held = calibration.held_out_indices()
    assert len(held) == 6 and len(calibration.calibration_images()) == 6
    images[held, 0, 0, 0] = -1.0  # marks the held-out images for FlipHeldOut
    calibration = Calibration([images])
    check = check_int8(FlipHeldOut(model), model, calibration)
    assert check["agreement"] == 0.0 and check["images"] == 6 and check["calibrated_on"] == 6
    for n, held_out in ((400, 100), (1000, 250)):  # at least 100, and a quarter of a larger source
        big = Calibration([torch.rand(n, 3, 2, 2)], limit=n)
        assert len(big.held_out_images()) == held_out and len(big.calibration_images()) == n - held_out

"""deploy.base: a MetaFormer folded wherever it sits in a model, and int8 agreement counted per pixel for
a segmenter's (B, K, H, W) logits."""

import pytest
import torch

from metaformer import create_model
from metaformer.deploy.base import check_agreement, fold_inference, foldable
from metaformer.errors import ExportError
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
    check = check_agreement(Flip(model, 0.25), model, batches)
    assert check == {"agreement": pytest.approx(0.75), "images": 2}
    with pytest.raises(ExportError, match="pixels of 2 calibration images"):
        check_agreement(Flip(model, 0.75), model, batches)

"""The check of a graph that should take every image size runs it at a second size: a graph fixed to
one size fails it instead of being cached as one artefact for every size."""

import pytest
import torch

from metaformer.deploy import onnx_export
from metaformer.deploy.base import other_size
from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


def segmenter() -> torch.nn.Module:
    overrides = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
    return create_segmenter(SegmenterConfig(3, backbone_overrides=overrides, fpn_channels=8, head_channels=8))


def test_the_second_size_has_another_height_width_and_aspect_ratio():
    for h, w in ((32, 32), (512, 672)):
        oh, ow = other_size((h, w))
        assert oh != h and ow != w and oh * w != ow * h and (oh % 32, ow % 32) != (0, 0)


def test_a_graph_fixed_to_one_size_fails_the_dynamic_size_check(monkeypatch, tmp_path):
    real = onnx_export._export_onnx

    def fixed_size(model, example, path, ranks, dynamic, dynamic_size):
        return real(model, example, path, ranks, dynamic, False)  # the size axes left out

    model = segmenter().eval()
    onnx_export.export_model(
        model, tmp_path / "ok.onnx", img_size=(32, 32), dynamic_batch=True, dynamic_size=True
    )
    monkeypatch.setattr(onnx_export, "_export_onnx", fixed_size)
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):  # onnxruntime refuses the second size
        onnx_export.export_model(
            model, tmp_path / "fixed.onnx", img_size=(32, 32), dynamic_batch=True, dynamic_size=True
        )
    assert not (tmp_path / "fixed.onnx").exists()

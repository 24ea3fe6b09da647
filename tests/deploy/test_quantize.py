"""deploy.quantize: both quantizers fit their ranges to the calibration images only, never to the
held-out ones the int8 model's agreement is measured on."""

import numpy as np
import pytest
import torch

from metaformer import create_model
from metaformer.deploy.onnx_export import export_model
from metaformer.deploy.quantize import Calibration, quantize_openvino, quantize_qdq

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "num_classes": 4}


class Seen(Exception):
    """Raised by the spies once they have read what the quantizer was handed."""


def numbered(n: int) -> Calibration:
    """Images whose every value is the image's index: what a quantizer reads names the image."""
    return Calibration([torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32)])


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_model(create_model("poolformer_s12", **TINY).eval(), path, img_size=(32, 32), dynamic_batch=True)
    return path


def test_onnxruntime_calibrates_on_the_images_not_held_out(onnx_file, tmp_path, monkeypatch):
    import onnxruntime.quantization as ortq

    seen: list[int] = []

    def spy(model_input, model_output, reader, **kwargs):
        while (item := reader.get_next()) is not None:
            seen.append(int(item["images"][0, 0, 0, 0]))
        raise Seen

    monkeypatch.setattr(ortq, "quantize_static", spy)
    calibration = numbered(12)
    with pytest.raises(Seen):
        quantize_qdq(onnx_file, tmp_path / "int8.onnx", calibration)
    held = set(calibration.held_out_indices())
    assert held and sorted(seen) == [i for i in range(12) if i not in held]


def test_openvino_calibrates_on_the_images_not_held_out(onnx_file, monkeypatch):
    import nncf

    seen: list[int] = []

    def spy(model, dataset, **kwargs):
        seen.extend(int(np.asarray(item)[0, 0, 0, 0]) for item in dataset.get_inference_data())
        raise Seen

    monkeypatch.setattr(nncf, "quantize", spy)
    calibration = numbered(12)
    with pytest.raises(Seen):
        quantize_openvino(onnx_file, calibration)
    held = set(calibration.held_out_indices())
    assert held and sorted(seen) == [i for i in range(12) if i not in held]

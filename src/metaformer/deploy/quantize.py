"""int8 post-training static quantization of our exported graph, calibrated on the user's own images.

Two of the field's quantizers, both starting from the folded ONNX graph (``onnx_export``):

- ``quantize_openvino``: NNCF's ``quantize`` on the OpenVINO model read from that graph (per-channel
  int8 weights, int8 activations, fast bias correction). OpenVINO runs it with VNNI/AMX int8 kernels.
  This is what the ``openvino`` backend ships.
- ``quantize_qdq``: onnxruntime's ``quantize_static`` writing a QDQ ONNX file (uint8 activations,
  MinMax calibration; int8 weights per channel by default, or one of the other ``QDQ_SETTINGS``), the
  portable int8 file. onnxruntime itself runs
  it slower than its fp32 graph on the CPUs we measured (see docs/performance.md); OpenVINO reads the
  same file and runs it fast.

Both quantize the matmuls and convolutions (stem, downsampling, the channel MLP); the GroupNorm
statistics (one fused MVN per norm in OpenVINO), the pooling mix, GELU and the head's norm stay in float
(``float_ops`` lists them).

A calibration set is a ``Calibration``: image batches preprocessed as for eval, read lazily (a cached
int8 model never reads them) and a ``key`` naming them for the cache (a folder's listing, or the
images' own hash when no key is given). A seeded quarter of its images (at least ``HELD_OUT_MIN``
where the source has twice that, never more than half) is held out: the quantizers calibrate on the
rest, and the int8 model's agreement with fp32 is measured on the held-out ones (``deploy.agreement``),
which its ranges were not fitted to.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metaformer.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 400  # 300 to calibrate (NNCF's default subset size) and 100 held out
HELD_OUT_MIN = 100  # held-out images where the source has at least twice as many
COMPUTE_OPS = {
    # ONNX and OpenVINO names of the ops that carry the FLOPs, and of those that stay in float
    "Conv", "Convolution", "MatMul", "Gemm", "Add", "Multiply", "Mul", "Sub", "Subtract", "Div", "Divide",
    "AveragePool", "AvgPool", "ReduceMean", "MVN", "Erf", "Gelu", "Sqrt", "Power", "Pow", "Softmax",
}  # fmt: skip
INT8_OPS = {"Conv", "Convolution", "MatMul", "Gemm"}
# ops that only move values (a quantized input read through them is still quantized: the FPN's
# lateral convolutions read the backbone's out norms through a Reshape)
MOVE_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten"}


@dataclass
class Calibration:
    """Images to calibrate int8 ranges on: ``batches`` of (B, C, H, W) float tensors, preprocessed as for
    eval; ``key`` names the set for the cache (None: the images' hash); at most ``limit`` are used."""

    batches: Iterable[torch.Tensor]
    key: str | None = None
    limit: int = CALIBRATION_IMAGES
    _images: list[np.ndarray] | None = field(default=None, repr=False)

    def images(self) -> list[np.ndarray]:
        """The calibration images as (1, C, H, W) float32 arrays, read once."""
        if self._images is None:
            images: list[np.ndarray] = []
            for batch in self.batches:
                batch = torch.as_tensor(batch)
                if batch.ndim == 3:
                    batch = batch.unsqueeze(0)
                if batch.ndim != 4:
                    raise DataError(
                        "calibration batches must be (B, C, H, W) image tensors, "
                        f"got shape {tuple(batch.shape)}"
                    )
                for image in batch.detach().to("cpu", torch.float32):
                    images.append(image.unsqueeze(0).contiguous().numpy())
                    if len(images) >= self.limit:
                        break
                if len(images) >= self.limit:
                    break
            if not images:
                raise DataError("the calibration set holds no images; pass a folder or batches with some")
            self._images = images
        return self._images

    def digest(self) -> str:
        """A short key for the cache: ``key`` if given, else the hash of the images themselves."""
        if self.key is not None:
            return hashlib.sha256(f"{self.key}|{self.limit}".encode()).hexdigest()[:16]
        digest = hashlib.sha256()
        for image in self.images():
            digest.update(image.tobytes())
        return digest.hexdigest()[:16]

    def held_out_indices(self) -> list[int]:
        """Which of ``images()`` are held out: a seeded quarter, at least ``HELD_OUT_MIN`` where the source
        holds twice that, at most half (a set of one image is only calibrated on)."""
        n = len(self.images())
        count = max(n // 4, min(HELD_OUT_MIN, n // 2))
        return sorted(int(i) for i in np.random.default_rng(0).permutation(n)[:count])

    def calibration_images(self) -> list[np.ndarray]:
        """The images the quantizers fit their ranges to: every one not held out."""
        held = set(self.held_out_indices())
        return [image for i, image in enumerate(self.images()) if i not in held]

    def held_out_images(self) -> list[np.ndarray]:
        """The images int8's agreement with fp32 is measured on (never calibrated on)."""
        images = self.images()
        return [images[i] for i in self.held_out_indices()]

    def stacked(self, batch_size: int = 32, *, held_out: bool = False) -> Iterator[torch.Tensor]:
        """All images in batches, or only the held-out ones."""
        images = self.held_out_images() if held_out else self.images()
        for start in range(0, len(images), batch_size):
            yield torch.from_numpy(np.concatenate(images[start : start + batch_size]))


def as_calibration(calibration: Calibration | Iterable[torch.Tensor] | None) -> Calibration | None:
    if calibration is None or isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, torch.Tensor):
        return Calibration([calibration])
    return Calibration(calibration)


def require_calibration(calibration: Calibration | None) -> Calibration:
    if calibration is None:
        raise ConfigError(
            "int8 needs calibration images: pass calibration= (image batches) in Python or "
            "--calibration-data DIR on the command line"
        )
    return calibration


def quantize_openvino(onnx_path: Path, calibration: Calibration) -> Any:
    """NNCF post-training quantization of the OpenVINO model converted from ``onnx_path``; returns an
    ov.Model.

    The model comes from ``ov.convert_model``, not ``Core.read_model``: conversion fuses our explicit
    mean/variance ops into MVN and Erf into Gelu before NNCF sees the graph. Read raw, NNCF puts
    FakeQuantize nodes inside each norm's ReduceMean/Sub/Mul/Sqrt/Div chain, the CPU plugin can no
    longer fuse it into MVN, and the int8 S12 ran at 0.95x timm's (whose InstanceNormalization reads as
    MVN) instead of 1.1x (docs/performance.md)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA" note on import
    import nncf
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    images = calibration.calibration_images()
    dataset = nncf.Dataset(images)
    _quiet_nncf()
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars on stdout
        return nncf.quantize(
            model,
            dataset,
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(images),
            fast_bias_correction=True,
        )


# onnxruntime's int8 settings (its quantization guide): U8S8 per channel is the default; on x86-64 CPUs
# without VNNI its U8S8 kernels (VPMADDUBSW) sum pairs into 16 bits, which can saturate, and the guide
# recommends 7-bit weights (reduce_range) or U8U8 there. Which one keeps a model's answers, and which
# is fastest, is measured on the machine (``backend_onnxruntime``).
QDQ_SETTINGS: dict[str, dict[str, Any]] = {
    "u8s8": {"per_channel": True, "weight_type": "QInt8", "reduce_range": False},
    "u8s8-reduce-range": {"per_channel": True, "weight_type": "QInt8", "reduce_range": True},
    "u8u8": {"per_channel": True, "weight_type": "QUInt8", "reduce_range": False},
    "u8s8-per-tensor": {"per_channel": False, "weight_type": "QInt8", "reduce_range": False},
}


def quantize_qdq(onnx_path: Path, out_path: Path, calibration: Calibration, setting: str = "u8s8") -> None:
    """onnxruntime's static quantization of ``onnx_path`` into a QDQ file at ``out_path``, with one of
    ``QDQ_SETTINGS``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    chosen = QDQ_SETTINGS[setting]

    images = calibration.calibration_images()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self.items, None)
            return None if image is None else {"images": image}

    root = logging.getLogger()  # onnxruntime's quantizer writes its notes to the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(
            str(onnx_path),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            per_channel=chosen["per_channel"],
            reduce_range=chosen["reduce_range"],
            activation_type=QuantType.QUInt8,
            weight_type=getattr(QuantType, chosen["weight_type"]),
        )
    finally:
        root.setLevel(level)


def float_ops(model: Any) -> dict[str, dict[str, int]]:
    """{"int8": {op: count}, "float": {op: count}} for the compute ops of a quantized model. An op runs in
    int8 when it has int8 kernels (convolution, matmul) and reads a quantized input (from an ONNX
    DequantizeLinear or an OpenVINO FakeQuantize, directly or through ``MOVE_OPS``); every other op
    computes in float, on dequantized values where its input was quantized."""
    found: dict[str, dict[str, int]] = {"int8": {}, "float": {}}
    if hasattr(model, "get_ordered_ops"):  # an OpenVINO model

        def origin(node: Any) -> str:
            while node.get_type_name() in MOVE_OPS:
                node = node.input(0).get_source_output().get_node()
            return node.get_type_name()

        nodes = [
            (op.get_type_name(), [origin(inp.get_source_output().get_node()) for inp in op.inputs()])
            for op in model.get_ordered_ops()
        ]
        quant = {"FakeQuantize"}
    else:  # an onnx.ModelProto
        producer = {out: node for node in model.graph.node for out in node.output}

        def onnx_origin(name: str) -> str:
            node = producer.get(name)
            while node is not None and node.op_type in MOVE_OPS:
                node = producer.get(node.input[0])
            return "" if node is None else node.op_type

        nodes = [(node.op_type, [onnx_origin(name) for name in node.input]) for node in model.graph.node]
        quant = {"DequantizeLinear"}
    for op, sources in nodes:
        if op in COMPUTE_OPS:
            kind = "int8" if op in INT8_OPS and any(source in quant for source in sources) else "float"
            found[kind][op] = found[kind].get(op, 0) + 1
    return found


def _quiet_nncf() -> None:
    """NNCF logs its progress bars and notes at INFO; a library call should not print them."""
    try:
        from nncf.common.logging.logger import set_log_level

        set_log_level(logging.ERROR)
    except ImportError:  # pragma: no cover - another NNCF layout
        pass


__all__ = [
    "CALIBRATION_IMAGES",
    "HELD_OUT_MIN",
    "QDQ_SETTINGS",
    "Calibration",
    "as_calibration",
    "float_ops",
    "quantize_openvino",
    "quantize_qdq",
    "require_calibration",
]

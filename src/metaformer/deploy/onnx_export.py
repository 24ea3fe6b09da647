"""Export a model to ONNX or TorchScript, checked before it is written under its real name.

ONNX files pass ``onnx.checker`` and must match PyTorch within ``atol`` (max absolute difference,
default 1e-4) on onnxruntime; TorchScript files are loaded back and compared the same way. The file
is written to a temp path next to the target and only renamed into place once every check passed.

GroupNorm with one group (the PoolFormer norm) is written as explicit ReduceMean / Sub / Mul / Sqrt
ops, never as ONNX ``GroupNormalization``: some runtimes read ``GroupNormalization(num_groups=1)``
as an instance norm, and the legacy exporter's InstanceNormalization rewrite is not portable either.
By default the exported graph is the folded inference graph of ``optimize_for_inference`` in
portable ops (plain MatMul/Conv, no oneDNN calls), which runtimes also run faster. Every backend
that runs an exported graph (onnxruntime, OpenVINO, their int8 files) starts from this one.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metaformer.deploy.base import fold_inference, foldable, other_size
from metaformer.deploy.runtimes import onnxruntime_session
from metaformer.errors import ExportError, check_choice

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
# The cache key holds this: bump it whenever the exported graph or how a backend converts or quantizes
# it changes, so an artefact built by older code is never reused (2: NNCF quantizes the converted graph)
EXPORT_VERSION = 2


class PortableGroupNorm(nn.Module):
    """GroupNorm written with mean/variance ops so every runtime computes it the same way."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        groups = x.reshape(shape[0], self.num_groups, -1)
        mean = groups.mean(dim=2, keepdim=True)
        centred = groups - mean
        var = (centred * centred).mean(dim=2, keepdim=True)
        x = (centred / torch.sqrt(var + self.eps)).reshape(shape)
        view = (1, -1) + (1,) * (x.ndim - 2)
        if self.weight is not None:
            x = x * self.weight.view(view)
        if self.bias is not None:
            x = x + self.bias.view(view)
        return x


def portable_model(model: nn.Module, *, fold: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` that exports to portable ops (the input model is not changed).

    ``fold=True`` starts from the folded inference model (``optimize_for_inference`` of the model or of
    the MetaFormer backbone in it), whose traced graph uses plain ops; every remaining ``nn.GroupNorm``
    becomes a ``PortableGroupNorm``.
    """
    if fold and foldable(model):
        model = fold_inference(model)
    else:
        model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, child_name, PortableGroupNorm(child))
    return model


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely the exported model matches PyTorch."""

    path: Path
    format: str
    img_size: tuple[int, int]
    dynamic_batch: bool
    max_abs_diff: float
    checked_batches: tuple[int, ...]
    seconds: float
    precision: str = "fp32"
    agreement: float | None = None  # int8: top-1 agreement with fp32 on the calibration images
    calibration_images: int = 0


def outputs(result: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def max_abs_diff(expected: list[torch.Tensor], got: list) -> float:
    if len(expected) != len(got):
        raise ExportError(
            f"the exported model returns {len(got)} outputs but PyTorch returns {len(expected)}"
        )
    worst = 0.0
    for ref, out in zip(expected, got, strict=True):
        out = torch.as_tensor(out)
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(
                f"exported output shape {tuple(out.shape)} differs from PyTorch's {tuple(ref.shape)}"
            )
        worst = max(worst, (out.float() - ref.float()).abs().max().item())
    return worst


def _export_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, ranks: list[int], dynamic: bool, dynamic_size: bool
) -> None:
    """``ranks``: each output's number of dimensions (a 4-D output's height and width vary with
    ``dynamic_size``, under their own names: a segmenter's match the input's, a backbone's do not)."""
    import onnx

    output_names = ["logits"] if len(ranks) == 1 else [f"features_{i}" for i in range(len(ranks))]
    dynamic_axes = None
    if dynamic or dynamic_size:
        dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}}
        for name, rank in zip(output_names, ranks, strict=True):
            spatial = {2: f"{name}_height", 3: f"{name}_width"} if dynamic_size and rank == 4 else {}
            dynamic_axes[name] = {0: "batch", **spatial}
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=DEFAULT_OPSET,
            do_constant_folding=True,
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the exported ONNX file fails onnx's checker: {err}") from err
    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    bad = ops & {"GroupNormalization", "InstanceNormalization"}
    if bad:
        raise ExportError(f"the exported graph contains {', '.join(sorted(bad))}, which runtimes disagree on")


def _run_onnx(path: Path, x: torch.Tensor) -> list:
    return onnxruntime_session(path).run(None, {"images": x.numpy()})


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    format: str = "onnx",
    img_size: tuple[int, int] = (224, 224),
    dynamic_batch: bool = False,
    fold: bool = True,
    atol: float = 1e-4,
    dynamic_size: bool = False,
) -> ExportReport:
    """Write ``model`` as ONNX or TorchScript, atomically, after checking it against PyTorch.

    A fixed-batch file takes batches of 1. The check runs seeded random batches through both (of 1,
    or of 2, 1 and 3 with ``dynamic_batch``) and requires a max absolute difference <= ``atol``.
    ``dynamic_size`` (ONNX): the file takes any height and width (a segmenter's images differ in size
    after its keep-ratio resize); one more batch of 1 at another size and aspect ratio checks that.
    """
    from metaformer.weights.io import atomic_write

    check_choice("export format", format, FORMATS)
    h, w = int(img_size[0]), int(img_size[1])
    in_chans = getattr(model, "in_chans", 3)
    start = time.perf_counter()
    model = copy.deepcopy(model).cpu().float().eval()  # the caller's model keeps its device and mode
    exported = portable_model(model, fold=fold).cpu()
    generator = torch.Generator().manual_seed(0)
    batches = (2, 1, 3) if dynamic_batch else (1,)  # the first is traced: a fixed-batch file takes 1
    sizes = [(b, h, w) for b in batches]
    if dynamic_size and format == "onnx":
        sizes.append((1, *other_size((h, w))))
    inputs = [torch.randn(b, in_chans, *hw, generator=generator) for b, *hw in sizes]
    with torch.no_grad():
        if hasattr(model, "check_input"):
            model.check_input(inputs[0])
        expected = [outputs(model(x)) for x in inputs]
    path = Path(path)
    worst = 0.0
    with atomic_write(path) as tmp, torch.no_grad():
        if format == "onnx":
            ranks = [out.ndim for out in expected[0]]
            _export_onnx(exported, inputs[0], tmp, ranks, dynamic_batch, dynamic_size)
            for want, x in zip(expected, inputs, strict=True):
                worst = max(worst, max_abs_diff(want, _run_onnx(tmp, x)))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit deprecation notes
                traced = torch.jit.trace(exported, (inputs[0],), check_trace=False, strict=False)
                torch.jit.save(traced, str(tmp))
                loaded = torch.jit.load(str(tmp), map_location="cpu")
            for want, x in zip(expected, inputs, strict=True):
                worst = max(worst, max_abs_diff(want, outputs(loaded(x))))
        if not worst <= atol:
            raise ExportError(
                f"the exported model differs from PyTorch by up to {worst:.3g} (allowed {atol:g}); "
                f"nothing was written to {path}"
            )
    report = ExportReport(path, format, (h, w), dynamic_batch, worst, batches, time.perf_counter() - start)
    logger.debug("wrote %s (%s, max abs diff %.2g vs PyTorch)", path, format, worst)
    return report


__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_VERSION",
    "FORMATS",
    "ExportReport",
    "PortableGroupNorm",
    "export_model",
    "max_abs_diff",
    "outputs",
    "portable_model",
]

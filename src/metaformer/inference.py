"""Run a trained model for inference on the fastest backend this machine has: our PyTorch fast path
(``optimize_for_inference``) or onnxruntime on the exported, folded graph.

Which one is faster depends on the CPU: on a 2-core AVX2 machine onnxruntime ran our folded graph
1.25x faster than the fast path, on an AVX512 machine the two were within 10%. So ``backend="auto"``
measures both on the real batch shape the first time (``models.routes``, route ``backend``) and keeps
the faster; the choice is cached per machine, and once torch is known to win nothing is exported
again. onnxruntime's outputs are checked against PyTorch (max abs diff <= 1e-4) before use.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaformer.errors import ConfigError, ExportError, check_choice
from metaformer.models import routes
from metaformer.models.fast import optimize_for_inference
from metaformer.models.metaformer import MetaFormer, MetaFormerFeatures

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_options(threads: int | None = None) -> Any:
    """Session options for a CPU session that shares the cores with PyTorch and data loading.

    onnxruntime's worker threads spin by default after each run, waiting for the next one; on a
    2-core machine that spin takes the cores from whatever runs in between (the data loader, the
    metrics, PyTorch itself). Measured on 2 cores: a PyTorch batch-1 forward right after an
    onnxruntime run took 39 ms with spinning and 23 ms without, the onnxruntime batch of 32 itself
    761 ms and 555 ms, while a session running alone lost at most 5% without it. So it is off.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session behind the module interface: (B, C, H, W) float tensor in, logits out."""

    def __init__(self, path: Path, *, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = onnxruntime_options(threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.register_buffer("device_anchor", torch.zeros(()))  # callers ask a module for its device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"images": images})[0])


def to_onnxruntime(model: nn.Module, img_size: tuple[int, int], *, atol: float = 1e-4) -> OnnxRuntimeModel:
    """Export ``model`` (folded, dynamic batch) and open it in onnxruntime, after ``export_model`` has
    checked its outputs against PyTorch on batches of 2, 1 and 3."""
    from metaformer.export import export_model

    if not onnxruntime_available():
        raise ConfigError(
            "the onnxruntime backend needs the onnx and onnxruntime packages; "
            "pip install 'metaformer[export]' or use --backend torch"
        )
    with tempfile.TemporaryDirectory(prefix="metaformer-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_model(model, path, img_size=img_size, dynamic_batch=True, atol=atol)
        return OnnxRuntimeModel(path)


def prepare_for_inference(
    model: nn.Module,
    *,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    img_size: tuple[int, int] = (224, 224),
    batch_size: int = 32,
    amp: torch.dtype | None = None,
) -> tuple[nn.Module, str]:
    """(a module to call on image batches, the backend it runs on) for an eval-mode ``model`` on ``device``.

    ``torch`` is the fast path (plain model under autocast, which it does not fold); ``onnxruntime``
    runs on the CPU in fp32; ``auto`` takes onnxruntime only where it is installed and measured faster.
    """
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device)
    foldable = isinstance(model, (MetaFormer, MetaFormerFeatures))
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ConfigError("the onnxruntime backend runs on the CPU; drop --device or use --backend torch")
        if amp is not None:
            raise ConfigError("the onnxruntime backend runs in fp32; drop --amp or use --backend torch")
        return to_onnxruntime(model, img_size), "onnxruntime"
    fast = optimize_for_inference(model) if foldable and amp is None else model
    if backend == "torch" or device.type != "cpu" or amp is not None or not foldable:
        return fast, "torch"
    if not onnxruntime_available():
        return fast, "torch"
    h, w = img_size
    shape_class = f"{getattr(model, 'model_name', type(model).__name__)}-{h}x{w}-b{routes.bucket(batch_size)}"
    if routes.known("backend", shape_class) == "torch":
        return fast, "torch"
    try:
        ort_model = to_onnxruntime(model, img_size)
    except ExportError as error:  # measured nothing: PyTorch is the one that gives the right outputs
        logger.warning("onnxruntime backend skipped: %s", error)
        return fast, "torch"
    example = torch.randn(batch_size, getattr(model, "in_chans", 3), h, w, device=device)
    with torch.no_grad():
        fast(example)  # the fast path's own routes are measured on its first call: not part of its time
        candidates = {"torch": lambda: fast(example), "onnxruntime": lambda: ort_model(example)}
        choice = routes.choose("backend", shape_class, candidates, min_rounds=5)
    return (ort_model, "onnxruntime") if choice == "onnxruntime" else (fast, "torch")

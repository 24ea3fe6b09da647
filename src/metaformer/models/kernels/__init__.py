"""Optional native CPU kernels for a PoolFormer block's pooling half, built on first use with the C compiler.

That element-wise work (statistics, pooling, mixing and, in the inference fast path, the second norm)
is memory-bound; torch runs it as seven passes over the map, ``pool_mix.c`` as three, and in training
its backward as one kernel too.
It is plain C (no torch headers, so it compiles in about a second), loaded with ctypes and parallel
with OpenMP: the dynamic loader resolves its ``libgomp.so.1`` to the one torch already loaded, so
both share one thread pool.

Nothing here is required: with no compiler, a failed build, ``METAFORMER_NATIVE=0``, or a tensor the
kernel does not take (not fp32, not channels-last, autograd), callers use the torch ops instead.
The build goes to ``$METAFORMER_HOME/kernels`` (or ``~/.cache/metaformer/kernels``), keyed by the
source, the flags and the CPU, and is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pool_mix.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")


def _flags() -> tuple[str, ...]:
    """``METAFORMER_NATIVE_MARCH=haswell`` builds for an older CPU (how an AVX2-only machine is
    simulated on a newer one, with ``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
    ATEN_CPU_CAPABILITY=avx2``)."""
    march = os.environ.get("METAFORMER_NATIVE_MARCH", "native")
    return tuple(f"-march={march}" if flag == "-march=native" else flag for flag in FLAGS)


def _cpu_signature() -> str:
    """The CPU model and flags: ``-march=native`` code must not be reused on a different CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    home = os.environ.get("METAFORMER_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "metaformer") / "kernels"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    flags = _flags()
    key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = _cache_dir() / f"pool_mix-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@cache
def native_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they are switched off or cannot be built here."""
    if os.environ.get("METAFORMER_NATIVE", "1") == "0" or platform.system() != "Linux":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.debug("no C compiler found; the fast path uses torch ops for the pooling half")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        logger.debug("native kernels unavailable (%s %s)", error, detail.decode(errors="replace")[-500:])
        return None
    ptr, i32, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    signatures = {
        "metaformer_pool_mix_forward": [ptr] * 7 + [i32] * 5 + [f32] * 2 + [i32],
        "metaformer_pool_mix_train_backward": [ptr] * 8 + [i32] * 6,
        "metaformer_bias_gelu_forward": [ptr] * 3 + [i32, ctypes.c_long, i32, i32],
        "metaformer_bias_gelu_backward": [ptr] * 4 + [ctypes.c_long, i32, i32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i32, argtypes
    return lib


_ENABLED = [True]


@contextlib.contextmanager
def native_kernels(enabled: bool) -> Iterator[None]:
    """Switch the native kernels on or off inside a block (op counting, benchmarks of the torch path)."""
    previous = _ENABLED[0]
    _ENABLED[0] = enabled
    try:
        yield
    finally:
        _ENABLED[0] = previous


def fx_tracing() -> bool:
    """Inside ``torch.fx.symbolic_trace`` (or torchvision's ``create_feature_extractor``): tensors are
    proxies there, so code that branches on a tensor's shape, dtype or layout must not run."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


# ``native_ops`` (the kernels as custom ops for compiled graphs) puts itself here when imported: importing
# it loads Dynamo (seconds), so only ``metaformer.compiling`` does, before it compiles a model
COMPILED_OPS: list = [None]


def portable() -> bool:
    """Tracing (TorchScript or FX), scripting or compiling: the graph must hold ops every exporter and
    compiler knows, and no Python branch may inspect a tensor."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling() or fx_tracing()


def native_available() -> bool:
    """Whether the kernels may run here: switched on, built, and not inside a traced or compiled graph."""
    return _ENABLED[0] and not portable() and native_library() is not None


def _native_map(x: torch.Tensor) -> bool:
    return (
        native_available()  # first: it is False while tracing, where x may be an FX proxy
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def pool_mix_supported(x: torch.Tensor) -> bool:
    """Whether ``pool_mix`` takes this map: CPU fp32 channels-last, no autograd, kernels available."""
    return _native_map(x) and not (torch.is_grad_enabled() and x.requires_grad)


def _check(status: int, name: str) -> None:
    if status != 0:
        raise MemoryError(f"{name} could not allocate its work buffers")


def pool_mix(
    x: torch.Tensor, scale: torch.Tensor, radius: int, eps: float, norm_eps: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = lerp(x, avgpool(x), scale / std(x))`` per sample (padding not counted, window 2r+1) and,
    if ``norm_eps`` is given, ``y`` normalised per sample; channels-last (B, C, H, W) fp32 maps."""
    lib = native_library()
    assert lib is not None
    b, c, h, w = x.shape
    scale = scale.reshape(c).contiguous()
    y = torch.empty_like(x, memory_format=torch.channels_last)
    normed = None if norm_eps is None else torch.empty_like(x, memory_format=torch.channels_last)
    status = lib.metaformer_pool_mix_forward(
        x.data_ptr(), y.data_ptr(), None if normed is None else normed.data_ptr(), scale.data_ptr(),
        None, None, None, b, h, w, c, radius, eps, 0.0 if norm_eps is None else norm_eps,
        torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "pool_mix")
    return y, normed


def pool_mix_train_supported(x: torch.Tensor) -> bool:
    """Whether ``pool_mix_train`` takes this map: CPU fp32 channels-last and the kernels available."""
    return _native_map(x)


def pool_mix_train_forward(
    x: torch.Tensor, k: torch.Tensor, multiplier: torch.Tensor | None, radius: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pool_mix_train``'s kernel: y, and the per-sample mean and rstd its backward needs."""
    lib = native_library()
    b, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    k = k.detach().float().contiguous()
    mult = None if multiplier is None else multiplier.detach().float().reshape(b).contiguous()
    y = torch.empty_like(x, memory_format=torch.channels_last)
    mean, rstd = x.new_empty(b), x.new_empty(b)
    status = lib.metaformer_pool_mix_forward(  # type: ignore[union-attr]
        x.data_ptr(), y.data_ptr(), None, k.data_ptr(), None if mult is None else mult.data_ptr(),
        mean.data_ptr(), rstd.data_ptr(), b, h, w, c, radius, eps, 0.0, torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "pool_mix_train")
    return y, mean, rstd


def pool_mix_train_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    k: torch.Tensor,
    multiplier: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    radius: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pool_mix_train``'s backward kernel: the gradients for ``x`` and ``k`` (fp32)."""
    b, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.float().contiguous(memory_format=torch.channels_last)
    k = k.detach().float().contiguous()
    mult = None if multiplier is None else multiplier.detach().float().reshape(b).contiguous()
    dx = torch.empty_like(x, memory_format=torch.channels_last)
    dk = k.new_empty(c)
    backward = native_library().metaformer_pool_mix_train_backward  # type: ignore[union-attr]
    status = backward(
        x.data_ptr(), grad.data_ptr(), dx.data_ptr(), dk.data_ptr(), k.data_ptr(),
        None if mult is None else mult.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        b, h, w, c, radius, torch.get_num_threads(),
    )  # fmt: skip
    _check(status, "pool_mix_train backward")
    return dx, dk


class _PoolMixTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, bias, mult, radius, eps):  # type: ignore[override]
        y, mean, rstd = pool_mix_train_forward(x, k, mult, radius, eps)
        ctx.save_for_backward(x, k, mult, mean, rstd)
        ctx.radius, ctx.bias_shape = radius, None if bias is None else bias.shape
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, k, mult, mean, rstd = ctx.saved_tensors
        dx, dk = pool_mix_train_backward(grad, x, k, mult, mean, rstd, ctx.radius)
        # GroupNorm's bias cancels in pool(y) - y (a constant pools to itself): its gradient is exactly 0
        dbias = None if ctx.bias_shape is None else dk.new_zeros(ctx.bias_shape)
        return dx, dk, dbias, None, None, None


def pool_mix_train(
    x: torch.Tensor,
    k: torch.Tensor,
    *,
    radius: int,
    eps: float,
    bias: torch.Tensor | None = None,
    multiplier: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x + m * k * (avgpool(x) - x) / std(x)`` per sample, differentiable in ``x`` and ``k``: a pooling
    block's first half, ``x + ls * (pool(gn(x)) - gn(x))`` with ``k = ls * gn.weight``. ``bias`` (the
    norm's, which cancels) gets a zero gradient, so data-parallel training sees every parameter used;
    ``multiplier`` is stochastic depth's per-sample factor."""
    return _PoolMixTrain.apply(x, k, bias, multiplier, radius, eps)


def linear_gelu_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear_gelu`` takes these rows: CPU fp32, outside autocast, kernels available."""
    return (
        native_available()  # first: it is False while tracing, where x may be an FX proxy
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


class _LinearGelu(torch.autograd.Function):
    """gelu(x W^T + b) on (N, C) rows: one GEMM, then one native pass that adds the bias and writes the
    activation and GELU's derivative. The derivative is kept instead of the pre-activation, so the
    backward is one multiply (with the bias gradient summed in the same pass) and two GEMMs."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # type: ignore[override]
        lib = native_library()
        rows, cols = x.shape[0], weight.shape[0]
        h = torch.mm(x, weight.t())
        a = torch.empty_like(h)
        b = h.new_zeros(cols) if bias is None else bias.detach().contiguous()
        lib.metaformer_bias_gelu_forward(  # type: ignore[union-attr]
            h.data_ptr(), b.data_ptr(), a.data_ptr(), 1, rows, cols, torch.get_num_threads()
        )
        ctx.save_for_backward(x, weight, h)  # h now holds gelu'(x W^T + b)
        ctx.has_bias = bias is not None
        return a

    @staticmethod
    def backward(ctx, grad_a):  # type: ignore[override]
        x, weight, derivative = ctx.saved_tensors
        grad_a = grad_a.contiguous()
        grad_z = torch.empty_like(grad_a)
        rows, cols = grad_a.shape
        db = grad_a.new_empty(cols) if ctx.has_bias and ctx.needs_input_grad[2] else None
        backward = native_library().metaformer_bias_gelu_backward  # type: ignore[union-attr]
        db_ptr = None if db is None else db.data_ptr()
        status = backward(
            grad_a.data_ptr(),
            derivative.data_ptr(),
            grad_z.data_ptr(),
            db_ptr,
            rows,
            cols,
            torch.get_num_threads(),
        )
        _check(status, "linear_gelu backward")
        dx = grad_z.mm(weight) if ctx.needs_input_grad[0] else None
        dw = grad_z.t().mm(x) if ctx.needs_input_grad[1] else None
        return dx, dw, db


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias))`` (exact erf GELU) on contiguous (N, C) fp32 rows, with the
    gradients of x, weight and bias; see ``_LinearGelu``."""
    return _LinearGelu.apply(x.contiguous(), weight.contiguous(), bias)


def bias_gelu_(h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``h = gelu(h + bias)`` in place on a contiguous (N, C) fp32 GEMM output (inference: no derivative)."""
    b = h.new_zeros(h.shape[1]) if bias is None else bias.contiguous()
    native_library().metaformer_bias_gelu_forward(  # type: ignore[union-attr]
        h.data_ptr(), b.data_ptr(), h.data_ptr(), 0, h.shape[0], h.shape[1], torch.get_num_threads()
    )
    return h

"""How metaformer opens the inference runtimes it deploys to: onnxruntime and OpenVINO.

Every session and compiled model is made here, so the settings that decide speed on a shared CPU are
the same for the backends, the export check, the quantizers and the benchmark:

- onnxruntime: intra-op threads = the requested (or PyTorch's) count, one inter-op thread, full graph
  optimisation, and worker threads that block between runs instead of spinning. On 2 cores the spin
  took the cores from whatever ran in between: a PyTorch batch-1 forward right after an onnxruntime
  run took 39 ms with spinning and 23 ms without, an onnxruntime batch of 32 itself 761 ms and 555 ms.
- OpenVINO: ``INFERENCE_PRECISION_HINT`` is always set. On a CPU with native bf16 its default is bf16,
  so an fp32 model left to the default silently runs in bf16; fp32 sets ``f32`` explicitly.
  ``INFERENCE_NUM_THREADS`` follows the requested (or PyTorch's) count and ``PERFORMANCE_HINT`` is
  ``LATENCY`` (one stream: one request at a time, as eval and predict send them). ``settings`` of a
  compiled model reads these back, so every figure can name what it ran with.

The runtimes' own kernels ignore ``ONEDNN_MAX_CPU_ISA`` / ``MKL_ENABLE_INSTRUCTIONS`` /
``ATEN_CPU_CAPABILITY``: under an AVX2 simulation of a newer CPU they still run AVX-512/VNNI/AMX code.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from metaformer.errors import ConfigError, ExportError

OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8 layers run int8; the rest in f32
PERFORMANCE_HINT = "LATENCY"
EXTRAS = {"onnxruntime": "export", "openvino": "openvino"}


def available(runtime: str) -> bool:
    """Whether ``runtime`` ("onnxruntime" or "openvino") and what it needs here are installed."""
    needs = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}[runtime]
    return all(importlib.util.find_spec(name) is not None for name in needs)


def require(runtime: str, flag: str = "--backend torch") -> None:
    """ConfigError in one sentence when ``runtime`` is not installed."""
    if not available(runtime):
        raise ConfigError(
            f"the {runtime} backend needs the {runtime} package; pip install 'metaformer[{EXTRAS[runtime]}]' "
            f"or use {flag}"
        )


def runtime_version(runtime: str) -> str:
    """The installed version of ``runtime`` (a cache key part: a new runtime rebuilds its artefacts)."""
    if runtime in ("torch", "compile"):
        return torch.__version__
    try:
        return version(runtime)
    except PackageNotFoundError:
        return "missing"


def threads_or_default(threads: int | None) -> int:
    return int(threads) if threads else torch.get_num_threads()


def onnxruntime_options(threads: int | None = None) -> Any:
    """Session options for a CPU session that shares the cores with PyTorch and data loading."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads_or_default(threads)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def onnxruntime_session(path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), onnxruntime_options(threads), providers=["CPUExecutionProvider"])


@functools.cache
def openvino_core() -> Any:
    import openvino as ov

    return ov.Core()


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which bf16 runs natively
_BF16_ISA_PREFIXES = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL")


def openvino_native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here. It reports cpuid's answer, but its
    oneDNN obeys ``ONEDNN_MAX_CPU_ISA``: under a cap below bf16 it fails to compile bf16 graphs."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap and not cap.startswith(_BF16_ISA_PREFIXES):
        return False
    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """The compile settings for ``precision`` ("fp32", "bf16" or "int8")."""
    return {
        "INFERENCE_PRECISION_HINT": OPENVINO_HINTS[precision],
        "INFERENCE_NUM_THREADS": threads_or_default(threads),
        "PERFORMANCE_HINT": PERFORMANCE_HINT,
    }


def openvino_compile(model: Any, precision: str, threads: int | None = None) -> Any:
    """``model`` (an ``ov.Model`` or a path to IR/ONNX) compiled for the CPU with ``openvino_config``.

    OpenVINO keeps the compiled blob in ``$METAFORMER_HOME/openvino`` (its ``CACHE_DIR``): a
    cached model then compiles in about a quarter of the time (0.18 s against 0.71 s for the digits
    demo's int8 S12), which is most of what a one-image ``predict`` waits for after the imports."""
    from metaformer.weights.download import cache_dir

    config = openvino_config(precision, threads)
    blobs = cache_dir() / "openvino"
    try:
        blobs.mkdir(parents=True, exist_ok=True)
        if os.access(blobs, os.W_OK):
            config["CACHE_DIR"] = str(blobs)
    except OSError:  # no cache: compile from scratch every time
        pass
    try:
        return openvino_core().compile_model(model, "CPU", config)
    except RuntimeError as error:  # a primitive this CPU (or ISA cap) lacks at this precision
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ExportError(
            f"OpenVINO could not compile the model at {precision} on this CPU ({reason}); "
            "use another --precision or --backend"
        ) from error


def openvino_settings(compiled: Any) -> dict[str, str]:
    """hint, threads and performance hint a compiled model really runs with (read back from OpenVINO)."""

    def get(name: str) -> str:
        value = compiled.get_property(name)
        if hasattr(value, "get_type_name"):  # an element type: bf16, f32
            return value.get_type_name()
        return str(getattr(value, "name", value))

    return {
        "hint": get("INFERENCE_PRECISION_HINT"),
        "threads": get("INFERENCE_NUM_THREADS"),
        "performance_hint": get("PERFORMANCE_HINT"),
    }


__all__ = [
    "OPENVINO_HINTS",
    "available",
    "onnxruntime_options",
    "onnxruntime_session",
    "openvino_compile",
    "openvino_config",
    "openvino_native_bf16",
    "openvino_settings",
    "require",
    "runtime_version",
]

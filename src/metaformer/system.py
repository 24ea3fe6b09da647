"""What this machine is and what was chosen on it: for benchmark headers and ``metaformer info --system``.

Every performance figure is only meaningful next to the machine it ran on. The project's reference
machine is a 2-core AVX2-only CPU without native bf16, where a 2-thread 2048x2048 fp32 matmul runs at
about 120 GFLOP/s; ``calibration`` measures the same matmul here (``metaformer info --system`` prints
it as the speed factor), so a budget of T reference seconds is T / factor seconds on this machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from metaformer.compiling import compile_cache_summary
from metaformer.models import routes
from metaformer.models.hardware import cpu_profile

REFERENCE_GFLOPS = 120.0  # 2-thread fp32 2048^3 matmul on the reference machine


def matmul_gflops(
    dtype: torch.dtype = torch.float32, *, size: int = 2048, seconds: float = 0.5, rounds: int = 3
) -> float:
    """Median GFLOP/s of square matmuls at the current thread count."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    rates = []
    for _ in range(rounds):
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            a @ b
            n += 1
        rates.append(2 * size**3 * n / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def calibration(threads: int = 2) -> dict[str, Any]:
    """This CPU next to the reference machine: the 2-thread fp32 matmul rate and the speed factor."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fp32 = matmul_gflops()
    finally:
        torch.set_num_threads(previous)
    return {"threads": threads, "fp32_gflops": round(fp32, 1), "factor": round(fp32 / REFERENCE_GFLOPS, 2)}


def machine_line(*, calibrate: bool = True) -> str:
    """One line for the top of every benchmark and demo timing: CPU, ISA, native bf16, factor."""
    line = (
        f"machine: {cpu_profile().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if calibrate:
        cal = calibration()
        line += (
            f"; calibrate: {cal['fp32_gflops']:.0f} GFLOP/s 2-thread fp32 matmul, factor {cal['factor']:.2f} "
            f"(reference: 2-core AVX2, {REFERENCE_GFLOPS:.0f} GFLOP/s)"
        )
    return line


def paired_ratio(base: list[float], times: list[float]) -> float:
    """The median over rounds of base / row, each pair timed in the same round: the host's slow drift
    (a shared machine's speed moves by tens of percent over minutes) cancels within a pair. For the
    benchmarks, which interleave their rows round by round."""
    return statistics.median(a / b for a, b in zip(base, times, strict=True))


def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn at random, in place: weights U(-0.05, 0.05), biases U(-0.2, 0.2), layer and
    res scales and norm weights 1 + U(-0.3, 0.3). The benchmarks compare outputs on these: at the 1e-5
    layer-scale init a broken token mixer moves the outputs by only ~1e-5 and passes a 1e-5 check."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.rand(param.shape, generator=generator) * 2 - 1
            if param.ndim == 1 and name.endswith(("scale", "weight")):
                param.copy_(1 + 0.3 * noise)
            elif param.ndim == 1 or name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(0.05 * noise)
    return model


def routes_summary() -> list[str]:
    """Lines naming the routes this process measured (what the fast and training paths took here)."""
    made = routes.decisions(include_cached=False)
    lines = ["", "routes chosen in this run (fastest round per candidate, ms):"] if made else []
    for d in made:
        times = ", ".join(f"{k} {v:.3g}" for k, v in sorted(d.times_ms.items(), key=lambda kv: kv[1]))
        lines.append(f"  {d.route} [{d.shape_class}]: {d.choice} ({times or d.source})")
    return lines


def probe_routes(*, img_size: int = 224, batch: int = 8) -> None:
    """Decide this machine's routes on a standard workload (PoolFormer-S12): the fast path's forward,
    and a channels-last training step in fp32 and, where bf16 is native, under bf16 autocast."""
    from metaformer.models import create_model
    from metaformer.models.fast import optimize_for_inference

    model = create_model("poolformer_s12").to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, img_size, img_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        optimize_for_inference(model)(x)
    model.train()
    dtypes = [None, torch.bfloat16] if cpu_profile().native_bf16 else [None]
    for dtype in dtypes:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(x[:, :, : img_size // 2, : img_size // 2]).float().logsumexp(1).mean()
        loss.backward()


def system_report(*, probe: bool = False) -> dict[str, Any]:
    """The CPU, its calibration and every route decided on it (measured now with ``probe``)."""
    if probe:
        probe_routes()
    profile = cpu_profile()
    return {
        "cpu": profile.model,
        "aten_isa": profile.isa,
        "onednn_max_isa": profile.onednn_max_isa,
        "mkl_max_isa": profile.mkl_max_isa,
        "extensions": list(profile.extensions),
        "native_bf16": profile.native_bf16,
        "signature": profile.signature,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **calibration(),
        "routes": routes.as_records(),
        "compile_cache": compile_cache_summary(),
    }

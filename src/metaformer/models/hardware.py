"""What the CPU under us can do: its model, instruction set and whether bf16 is native.

Defaults that depend on the hardware ask here, never assume the machine the code was written on. On a
CPU without AVX512-BF16 or AMX, oneDNN emulates bf16 and a bf16 matmul runs ~10x (or more) slower
than fp32, so nothing may pick bf16 there by default. torch's own ``torch.cpu._is_avx512_bf16_supported``
reads cpuid and ignores ``ONEDNN_MAX_CPU_ISA``, so a capped oneDNN (how one simulates an AVX2-only
machine on a newer one) would still report bf16 as native: the cap is honoured here.
``METAFORMER_NATIVE_BF16=0|1`` overrides the answer (simulation, or a CPU cpuinfo misreports).

MKL, which runs torch's fp32 matmuls on x86, has a cap of its own (``MKL_ENABLE_INSTRUCTIONS``): a
faithful AVX2 simulation sets it too, or the matmul peak (and every GEMM route) stays AVX-512's. Both
caps are part of the CPU signature, so choices measured under one never serve the other.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which its bf16 kernels are emulated
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "asimd", "sve")


@dataclass(frozen=True)
class CpuProfile:
    """One CPU as the defaults see it."""

    model: str
    isa: str  # ATen's kernel level: AVX512, AVX2, DEFAULT...; follows ATEN_CPU_CAPABILITY
    flags: frozenset[str]
    onednn_max_isa: str | None
    native_bf16: bool
    mkl_max_isa: str | None = None  # MKL_ENABLE_INSTRUCTIONS

    @property
    def signature(self) -> str:
        """A short key for caches of choices measured on this CPU (and under these ISA caps)."""
        caps = [self.onednn_max_isa or ""] + ([f"mkl:{self.mkl_max_isa}"] if self.mkl_max_isa else [])
        text = "\n".join([self.model, self.isa, *caps, " ".join(sorted(self.flags))])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def extensions(self) -> tuple[str, ...]:
        """The vector extensions that decide speed here, in cpuinfo's names."""
        return tuple(flag for flag in _NOTABLE_FLAGS if flag in self.flags)

    def describe(self) -> str:
        """One line for benchmark headers and ``metaformer info --system``."""
        cap = caps_text(self.onednn_max_isa, self.mkl_max_isa)
        extensions = " ".join(self.extensions) or "none of " + " ".join(_NOTABLE_FLAGS)
        return (
            f"{self.model}; ATen {self.isa}{cap}; {extensions}; "
            f"native bf16: {'yes' if self.native_bf16 else 'no'}"
        )


def caps_text(onednn: str | None, mkl: str | None) -> str:
    """The caps part of a machine line ("oneDNN capped at AVX2, MKL capped at AVX2"), empty without."""
    return (f", oneDNN capped at {onednn}" if onednn else "") + (f", MKL capped at {mkl}" if mkl else "")


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def profile_from(cpuinfo: str, *, isa: str, environ: dict[str, str] | None = None) -> CpuProfile:
    """The profile a cpuinfo text and environment describe; kept pure so both kinds of CPU can be
    simulated in tests."""
    env = os.environ if environ is None else environ
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    model = model or platform.processor() or platform.machine()
    cap = env.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() or None
    native = any(flag in flags for flag in _BF16_FLAGS) and cap not in _ONEDNN_NO_BF16
    if isa.upper() in ("DEFAULT", "AVX2"):  # ATen's own bf16 kernels are emulated below AVX512
        native = False
    override = env.get("METAFORMER_NATIVE_BF16")
    if override in ("0", "1"):
        native = override == "1"
    mkl = env.get("MKL_ENABLE_INSTRUCTIONS", "").strip().upper() or None
    return CpuProfile(model, isa, frozenset(flags), cap, native, mkl)


@cache
def cpu_profile() -> CpuProfile:
    """This process's CPU (read once)."""
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - very old torch
        isa = "DEFAULT"
    return profile_from(_read_cpuinfo(), isa=isa)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively (not emulated) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_profile().native_bf16
    return True  # other accelerators: trust the user's choice


_WARNED: set[str] = set()


def warn_emulated_bf16(device: torch.device | str = "cpu") -> None:
    """Once per process, one sentence: bf16 was asked for on a CPU that only emulates it."""
    if native_bf16(device) or "bf16" in _WARNED:
        return
    _WARNED.add("bf16")
    logger.warning(
        "warning: bf16 is emulated on this CPU (%s has no AVX512-BF16 or AMX) and runs many times slower "
        "than fp32; use --amp off here",
        cpu_profile().model,
    )

"""Capability detection, with both kinds of CPU simulated from their cpuinfo text."""

import pytest

from metaformer.models.hardware import cpu_profile, native_bf16, profile_from

SAPPHIRE_RAPIDS = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile
"""
AVX2_ONLY = """processor	: 0
model name	: AMD EPYC 7B12
flags		: fpu sse2 avx avx2 fma bmi2
"""


def test_a_native_bf16_cpu_is_recognised():
    profile = profile_from(SAPPHIRE_RAPIDS, isa="AVX512", environ={})
    assert profile.native_bf16
    assert profile.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert profile.extensions == ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    assert "native bf16: yes" in profile.describe()


def test_an_avx2_only_cpu_emulates_bf16():
    profile = profile_from(AVX2_ONLY, isa="AVX2", environ={})
    assert not profile.native_bf16
    assert "native bf16: no" in profile.describe() and "avx512f" not in profile.describe()


@pytest.mark.parametrize(
    ("environ", "isa", "native"),
    [
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX512", False),  # the reference-machine simulation
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"}, "AVX512", True),
        ({}, "AVX2", False),  # ATEN_CPU_CAPABILITY=avx2
        ({"METAFORMER_NATIVE_BF16": "0"}, "AVX512", False),
    ],
)
def test_isa_caps_and_the_override_are_honoured(environ, isa, native):
    assert profile_from(SAPPHIRE_RAPIDS, isa=isa, environ=environ).native_bf16 is native


def test_the_override_can_also_claim_native_bf16():
    assert profile_from(AVX2_ONLY, isa="AVX2", environ={"METAFORMER_NATIVE_BF16": "1"}).native_bf16


def test_signatures_differ_between_cpus_and_caps():
    signatures = {
        profile_from(SAPPHIRE_RAPIDS, isa="AVX512", environ={}).signature,
        profile_from(SAPPHIRE_RAPIDS, isa="AVX2", environ={"ONEDNN_MAX_CPU_ISA": "AVX2"}).signature,
        profile_from(AVX2_ONLY, isa="AVX2", environ={}).signature,
        profile_from(  # the full simulation also caps MKL's matmuls, so its GEMM routes differ
            SAPPHIRE_RAPIDS,
            isa="AVX2",
            environ={"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
        ).signature,
    }
    assert len(signatures) == 4


def test_the_machine_line_names_both_caps():
    environ = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "avx2"}
    line = profile_from(SAPPHIRE_RAPIDS, isa="AVX2", environ=environ).describe()
    assert "oneDNN capped at AVX2, MKL capped at AVX2" in line
    assert "capped" not in profile_from(SAPPHIRE_RAPIDS, isa="AVX512", environ={}).describe()


def test_this_machine_has_a_profile():
    profile = cpu_profile()
    assert profile.model and profile.isa
    assert native_bf16("cpu") is profile.native_bf16

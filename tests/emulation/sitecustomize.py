"""For runs on an emulated CPU only (``PYTHONPATH=tests/emulation``; see docs/development.md): keeps
PyTorch's own oneDNN and MKL off AVX2 code, which qemu runs about 1000x slower than natively.

Measured under qemu's Haswell model: a training step of the digits test model took 0.03 s natively and
28 s emulated (5-10 s with oneDNN capped); a 512x512 fp32 matmul ran at 0.006 GFLOP/s through MKL's AVX2
code and 0.4 GFLOP/s with MKL capped at SSE4.2. The int8 tests train and run PyTorch models for their
fp32 references, and the benchmarks time matmuls first. MKL serves only PyTorch here, so its cap stays.
oneDNN reads its cap once, at its first use: it is set for one convolution and one matrix product in
PyTorch and removed before anything else starts, so OpenVINO's own oneDNN, like onnxruntime, still picks
its kernels by cpuid (Haswell: AVX2, no VNNI), which is what these runs check.
"""

import os

os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
os.environ["ONEDNN_MAX_CPU_ISA"] = "SSE41"
try:
    import torch

    torch.nn.functional.conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3))
    torch.mm(torch.zeros(4, 4), torch.zeros(4, 4))
except ImportError:
    pass
finally:
    del os.environ["ONEDNN_MAX_CPU_ISA"]

"""For runs on an emulated CPU only (``PYTHONPATH=tests/emulation``; see docs/development.md): caps
PyTorch's own oneDNN at SSE4.1 before anything else starts.

qemu runs oneDNN's AVX2 JIT code about 1000x slower than natively (a training step of the digits test
model: 0.03 s natively, 28 s emulated; 5-10 s with this cap), and the int8 tests train and run PyTorch
models for their fp32 references. oneDNN reads the cap once, at its first use: it is set for one
convolution and one matrix product in PyTorch and removed before anything else starts, so OpenVINO's
own oneDNN and onnxruntime still pick their kernels by cpuid (Haswell: AVX2, no VNNI), which is what
these runs check.
"""

import os

os.environ["ONEDNN_MAX_CPU_ISA"] = "SSE41"
try:
    import torch

    torch.nn.functional.conv2d(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3))
    torch.mm(torch.zeros(4, 4), torch.zeros(4, 4))
except ImportError:
    pass
finally:
    del os.environ["ONEDNN_MAX_CPU_ISA"]

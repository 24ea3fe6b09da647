"""The opt-in Triton kernels of a PoolFormer block's pooling half (models/kernels/triton_pool*.py).

With a GPU the device tests run on CUDA tensors here. Without one they run on CPU tensors under
Triton's interpreter, which has to be switched on before Triton is first imported:
``test_kernels_under_the_interpreter`` runs this file again in a child process with
``TRITON_INTERPRET=1``. References are float64 autograd through GroupNorm and AvgPool2d.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from metaformer.models.fast import FoldedPoolBlock, fold_block
from metaformer.models.kernels import triton_pool
from metaformer.models.kernels.triton_pool import (
    TRITON_INSTALLED,
    pool_mix_triton,
    triton_kernels,
    triton_supported,
)
from metaformer.models.metaformer import MetaFormerBlock
from metaformer.models.mixers import Pooling

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[2]

needs_triton = pytest.mark.skipif(not TRITON_INSTALLED, reason="triton is not installed")
on_device = pytest.mark.skipif(
    not TRITON_INSTALLED or not (CUDA or INTERPRETED),
    reason="no GPU: runs in test_kernels_under_the_interpreter's child process",
)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # about one ulp, relative


@pytest.fixture(autouse=True)
def _triton_path_on():
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # block tests compare convolutions of nearly equal maps
    with triton_kernels(True, cpu=INTERPRETED):
        yield
    torch.backends.cudnn.allow_tf32 = previous


def reference(x, weight, bias, scale, multiplier, radius, eps=1e-5):
    """The torch path of the block's first half: x + m * ls * (pool(gn(x)) - gn(x))."""
    y = F.group_norm(x, 1, weight, bias, eps)
    mixed = F.avg_pool2d(y, 2 * radius + 1, 1, radius, count_include_pad=False) - y
    return x + multiplier.view(-1, 1, 1, 1) * scale.view(1, -1, 1, 1) * mixed


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_against_float64(dtype: torch.dtype, layout: str, h: int, w: int, radius: int = 1) -> None:
    """Output and the gradients for x, norm weight, norm bias and layer scale, with one sample dropped."""
    c = 5
    x = (torch.randn(2, c, h, w) * 2 + 0.5).to(DEVICE, dtype).contiguous(memory_format=LAYOUTS[layout])
    params = [torch.randn(c, device=DEVICE).to(dtype) for _ in range(3)]  # weight, bias, layer scale
    multiplier = torch.tensor([0.0, 1.25], device=DEVICE)
    grad = torch.randn(2, c, h, w, device=DEVICE).to(dtype)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, *params)]
    ref = reference(*ref_inputs, multiplier.double(), radius)
    ref.backward(grad.double())
    inputs = [t.detach().clone().requires_grad_() for t in (x, *params)]
    xt, weight, bias, scale = inputs
    out = pool_mix_triton(xt, weight * scale, radius=radius, eps=1e-5, bias=bias, multiplier=multiplier)
    out.backward(grad)

    assert out.dtype == dtype and out.is_contiguous(memory_format=LAYOUTS[layout])
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref) <= tol
    ref_x, ref_weight, ref_bias, ref_scale = ref_inputs
    for name, got, want in zip("xws", (xt, weight, scale), (ref_x, ref_weight, ref_scale), strict=True):
        assert got.grad.dtype == dtype
        assert rel_err(got.grad, want.grad) <= tol, name
    # the norm's bias cancels in pool(y) - y: exactly zero here, float64 round-off in the reference
    assert torch.count_nonzero(bias.grad) == 0
    assert ref_bias.grad.abs().max() <= 1e-12 * ref_x.grad.abs().max()


@on_device
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", TOLERANCE, ids=str)
@pytest.mark.parametrize("size", [(1, 1), (3, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pool_mix_matches_float64_autograd(size, dtype, layout):
    check_against_float64(dtype, layout, *size)


@on_device
@pytest.mark.parametrize(
    "dtype, layout",
    [(torch.float32, "nchw"), (torch.bfloat16, "channels_last")],
    ids=["float32-nchw", "bfloat16-channels_last"],
)
def test_pool_mix_matches_float64_autograd_over_several_row_blocks(dtype, layout, monkeypatch):
    """Windows that cross the rows of two programs, and partial sums from several programs added."""
    from metaformer.models.kernels import triton_pool_kernels

    monkeypatch.setattr(triton_pool_kernels, "ROWS_PER_PROGRAM", 2)  # 3 row blocks at H = 5
    check_against_float64(dtype, layout, 5, 3)


@on_device
@pytest.mark.parametrize("radius", [0, 2])
def test_other_odd_pool_sizes_match_float64_autograd(radius):
    check_against_float64(torch.float32, "channels_last", 3, 4, radius)


def pooling_block(dim: int = 6, drop_path: float = 0.0) -> MetaFormerBlock:
    block = MetaFormerBlock(
        dim, Pooling, {}, "groupnorm1", "gelu", 2.0, True, 0.0, drop_path, 0.5, None, False
    )
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return block.to(DEVICE)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the ``out_stats`` flag of every pool-and-mix kernel launch."""
    from metaformer.models.kernels import triton_pool_kernels

    calls: list[bool] = []
    launch = triton_pool_kernels.pool_mix_forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("out_stats", False))
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_pool_kernels, "pool_mix_forward", spy)
    return calls


def run_block(block, x, seed=3):
    torch.manual_seed(seed)
    xg = x.detach().clone().requires_grad_()
    out = block(xg)
    out.backward(torch.ones_like(out))
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return out.detach(), xg.grad, grads


@on_device
def test_training_block_matches_torch_path_with_the_same_stochastic_depth_draws(kernel_calls):
    block = pooling_block(drop_path=0.5).train()
    x = torch.randn(4, 6, 3, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    out, dx, grads = run_block(block, x)
    assert kernel_calls == [False]
    with triton_kernels(False):
        ref_out, ref_dx, ref_grads = run_block(block, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@on_device
def test_block_with_a_hook_keeps_the_torch_path(kernel_calls):
    block = pooling_block().eval()
    seen = []
    block.norm1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    block(torch.randn(2, 6, 3, 3, device=DEVICE))
    assert kernel_calls == [] and seen == [(2, 6, 3, 3)]


@on_device
def test_fast_path_block_matches_the_plain_block_with_fused_second_norm_statistics(kernel_calls):
    block = pooling_block().eval()
    folded = fold_block(block, tokens=False)
    assert isinstance(folded, FoldedPoolBlock)
    x = torch.randn(2, 6, 5, 3, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = folded(x)
        with triton_kernels(False):
            want = block(x)
    assert kernel_calls == [True]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@on_device
def test_custom_ops_pass_opcheck():
    x = torch.randn(1, 3, 2, 3, device=DEVICE, requires_grad=True)
    k = torch.randn(3, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    mult = torch.tensor([2.0], device=DEVICE)
    ops = torch.ops.metaformer
    torch.library.opcheck(ops.pool_mix, (x, k, bias, mult, 1, 1e-5, torch.float32))
    torch.library.opcheck(ops.pool_mix_normed, (x.detach(), k.detach(), 1, 1e-5, 1e-6))


@on_device
def test_compiled_block_has_one_graph_and_matches_eager(kernel_calls):
    """fullgraph=True: the gate and the custom op trace without a graph break (inductor on a GPU;
    on CPU aot_eager, since the interpreter gains nothing from minutes of C++ compilation)."""
    block = pooling_block(drop_path=0.3).train()
    compiled = torch.compile(block, backend="inductor" if CUDA else "aot_eager", fullgraph=True)
    x = torch.randn(3, 6, 3, 4, device=DEVICE)
    out, dx, grads = run_block(compiled, x)
    assert kernel_calls  # the compiled graph calls the op
    ref_out, ref_dx, ref_grads = run_block(block, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@on_device
def test_exported_block_holds_the_custom_op():
    block = pooling_block().eval()
    x = torch.randn(2, 6, 3, 3, device=DEVICE)
    program = torch.export.export(block, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "metaformer.pool_mix.default" in targets
    with triton_kernels(False):
        torch.testing.assert_close(program.module()(x), block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (CUDA and TRITON_INSTALLED), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_the_kernels():
    x = torch.randn(2, 6, 5, 4, device="cuda").contiguous(memory_format=torch.channels_last)
    k = torch.randn(6, device="cuda")
    ops = torch.ops.metaformer

    def run():
        return pool_mix_triton(x, k, radius=1, eps=1e-5), ops.pool_mix_normed(x, k, 1, 1e-5, 1e-6)[1]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    for got, want in zip(captured, run(), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_implementations_give_shapes_dtypes_and_layouts(layout):
    fmt = LAYOUTS[layout]
    with FakeTensorMode():
        x = torch.empty(2, 4, 3, 5, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        k = torch.empty(4)
        out, mean, rstd = torch.ops.metaformer.pool_mix(x, k, None, None, 1, 1e-5, torch.float32)
        y, normed = torch.ops.metaformer.pool_mix_normed(x, k, 1, 1e-5, 1e-5)
        dx, dk = torch.ops.metaformer.pool_mix_backward(out, x, k, None, mean, rstd, 1)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.is_contiguous(memory_format=fmt)
    assert mean.shape == rstd.shape == (2,) and mean.dtype == torch.float32
    assert y.dtype == normed.dtype == torch.bfloat16 and normed.is_contiguous(memory_format=fmt)
    assert dx.dtype == torch.bfloat16 and dx.is_contiguous(memory_format=fmt) and dk.shape == (4,)


def test_switch_and_device_gate():
    x = torch.randn(1, 2, 3, 3)
    with triton_kernels(False):
        assert not triton_supported(x.to(DEVICE))
    with triton_kernels(True):  # CPU tensors only with cpu=True under the interpreter
        assert not triton_supported(x)
        assert not triton_supported(x.to(torch.float64))
    with triton_kernels(True, cpu=True):
        assert triton_supported(x) == (INTERPRETED and TRITON_INSTALLED)


@needs_triton
@pytest.mark.skipif(INTERPRETED or CUDA, reason="the interpreter replaces compiled kernels; a GPU runs them")
def test_kernels_compile_for_a_hopper_gpu(tmp_path, monkeypatch):
    """Triton's own ptxas compiles every kernel for sm_90 without a GPU: what the interpreter skips."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from metaformer.models.kernels import triton_pool_kernels as kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    consts = {"R": 1, "HAS_MULT": True, "OUT_STATS": True, "BLOCK_W": 16, "BLOCK_C": 64, "BLOCK": 1024}
    data = {"x_ptr", "g_ptr", "y_ptr", "out_ptr", "dx_ptr"}
    for fn in (
        kernels._stats_partial_kernel,
        kernels._stats_finalize_kernel,
        kernels._pool_mix_fwd_kernel,
        kernels._pool_mix_bwd_reduce_kernel,
        kernels._pool_mix_bwd_dx_kernel,
        kernels._normalize_kernel,
    ):
        signature, constexprs = {}, {}
        for name in fn.arg_names:
            if name in consts:
                signature[name], constexprs[name] = "constexpr", consts[name]
            elif name.endswith("_ptr"):
                signature[name] = "*bf16" if name in data else "*fp32"
            else:
                signature[name] = "fp32" if name in ("eps", "inv_numel") else "i32"
        compiled = triton_compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], fn.__name__


@pytest.mark.skipif(INTERPRETED, reason="this test runs the child")
def test_package_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from metaformer import create_model\n"
        "from metaformer.models.kernels import triton_pool\n"
        "assert not triton_pool.TRITON_INSTALLED\n"
        "model = create_model('poolformer_s12', depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=3)\n"
        "with triton_pool.triton_kernels(True, cpu=True):\n"
        "    model(torch.randn(1, 3, 32, 32)).sum().backward()\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", METAFORMER_TRITON="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@needs_triton
@pytest.mark.skipif(CUDA or INTERPRETED, reason="the device tests run directly")
@pytest.mark.timeout(240)
def test_kernels_under_the_interpreter(tmp_path):
    """The child must run every device test case and pass it: one skipped (a wrong gate, triton missing
    in the child) is a failure here, not a green run that checked nothing."""
    import xml.etree.ElementTree as ET

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    report = tmp_path / "child.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=230)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    device_tests = {
        name: fn for name, fn in globals().items() if on_device.mark in getattr(fn, "pytestmark", [])
    }
    expected = sum(_cases(fn) for fn in device_tests.values())
    ran = {}  # device test case -> its outcome in the child
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.get("name", "").split("[")[0] in device_tests:
            outcome = next(
                (child.tag for child in case if child.tag in ("skipped", "failure", "error")), "passed"
            )
            ran[case.get("name")] = outcome
    assert len(device_tests) >= 9 and len(ran) == expected >= 22, (len(ran), expected)
    assert set(ran.values()) == {"passed"}, {name: o for name, o in ran.items() if o != "passed"}
    assert triton_pool.TRITON_INSTALLED


def _cases(fn) -> int:
    """How many test cases ``fn``'s parametrize marks make."""
    count = 1
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize":
            count *= len(mark.args[1])
    return count

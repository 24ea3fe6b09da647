"""The channel MLP's routes, one against another, on PoolFormer-S12's four stage shapes.

Training (``train_mlp``): forward + backward of ``Mlp`` through each route (1x1 convolutions, GEMMs on
channels-last rows, the GEMMs with fc1's bias and GELU fused natively), interleaved, medians, and the
sum over the network weighted by each stage's depth. Inference (``fast_mlp``): one folded block's MLP
through each route on one chunk of rows. Outputs are compared with the first route's.

    python benchmarks/mlp_routes.py                 # batch 16 (training), 3136-row chunks (inference)
    python benchmarks/mlp_routes.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from metaformer.system import machine_line

STAGES = ((64, 56, 2), (128, 28, 2), (320, 14, 6), (512, 7, 2))  # S12: width, side, depth


def timed(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items() if r % 2 == 0 else reversed(fns.items()):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _step(forward: Callable[[torch.Tensor], torch.Tensor], *, x, wanted, grad) -> Callable[[], object]:
    return lambda: torch.autograd.grad(forward(x), wanted, grad)


def training(batch: int, rounds: int, scale: int) -> None:
    from metaformer.models.layers import Mlp

    print(f"\ntrain_mlp: forward + backward, batch {batch} (ms; x = plain GEMMs / route)")
    total: dict[str, float] = {}
    for width, side, depth in STAGES:
        side = max(1, side // scale)
        mlp = Mlp(width, 4 * width).train()
        x = torch.randn(batch, width, side, side).contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        grad = torch.randn_like(x)
        routes = {"conv": mlp._forward_conv, "gemm": mlp._forward_rows}
        if mlp._fused_ok(x):
            routes["fused"] = mlp._forward_fused

        step = partial(_step, x=x, wanted=[x, *mlp.parameters()], grad=grad)

        reference = torch.autograd.grad(mlp._forward_conv(x), [x], grad)[0]
        for name, forward in routes.items():
            got = torch.autograd.grad(forward(x), [x], grad)[0]
            assert torch.allclose(got, reference, rtol=1e-4, atol=1e-5), f"{name} differs"
        ms = timed({name: step(fn) for name, fn in routes.items()}, rounds)
        for name, value in ms.items():
            total[name] = total.get(name, 0.0) + depth * value
        text = "  ".join(f"{name} {value:8.2f} (x{ms['gemm'] / value:.2f})" for name, value in ms.items())
        print(f"  stage {width:>4} x {side:>2}x{side:<2} depth {depth}:  {text}")
    text = "  ".join(f"{name} {value:8.1f} (x{total['gemm'] / value:.2f})" for name, value in total.items())
    print(f"  whole network, weighted by depth:  {text}")


def inference(rows: int, rounds: int, scale: int) -> None:
    from metaformer import create_model
    from metaformer.models.fast import fold_block

    print(f"\nfast_mlp: one folded block's MLP on {rows} rows (ms; x = plain GEMMs / route)")
    model = create_model("poolformer_s12").eval()
    with torch.inference_mode():
        for (width, _, _), stage in zip(STAGES, model.stages, strict=True):
            mlp = fold_block(stage.blocks[0], tokens=False).mlp
            n = max(8, rows // scale)
            x, normed = torch.randn(1, n, width), torch.randn(1, n, width)
            routes: dict[str, Callable[[], torch.Tensor]] = {
                "gemm": partial(mlp, x, normed, onednn=False),
                "onednn": partial(mlp, x, normed, onednn=True),
            }
            if mlp.fc1.native_ok(normed.reshape(-1, width)):
                routes["native"] = partial(mlp, x, normed, onednn=False, native=True)
            reference = routes["gemm"]()
            for name, run in routes.items():
                assert torch.allclose(run(), reference, rtol=1e-4, atol=1e-5), f"{name} differs"
            ms = timed(routes, rounds)
            text = "  ".join(f"{name} {value:7.3f} (x{ms['gemm'] / value:.2f})" for name, value in ms.items())
            print(f"  stage {width:>4}:  {text}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rows", type=int, default=3136, help="inference rows per call (one 56x56 sample)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, 2 rounds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scale = 8 if args.quick else 1
    if args.quick:
        args.batch, args.rounds = 2, 2
    print(machine_line(calibrate=not args.quick))
    training(args.batch, args.rounds, scale)
    inference(args.rows, args.rounds, scale)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

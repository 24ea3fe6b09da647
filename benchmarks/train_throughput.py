"""Training images/s of metaformer's poolformer_s12 against timm's, on the same batch, in one process.

Both models hold the same weights (ours built with ``final_norm="pooled"``, the head placement timm
uses, so the two compute the same function), see the same batch and use the same AdamW from
``timm.optim.create_optimizer_v2``. The first step's losses must agree before anything is timed. Timed
rounds alternate between the two models so that machine noise hits both alike; the median images/s
of each and their ratio are printed.

    python benchmarks/train_throughput.py                      # batch 32 at 224x224, 10 steps x 3 rounds
    python benchmarks/train_throughput.py --quick              # smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from metaformer import create_model


def build(batch: int, img_size: int, channels_last: bool) -> tuple[torch.nn.Module, torch.nn.Module, tuple]:
    reference = timm.create_model("poolformer_s12", num_classes=1000, drop_path_rate=0.0)
    ours = create_model("poolformer_s12", num_classes=1000, drop_path_rate=0.0, final_norm="pooled")
    ours.load_state_dict(reference.state_dict(), strict=True)  # timm names load as they are
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, img_size, img_size, generator=gen)
    targets = torch.randint(0, 1000, (batch,), generator=gen)
    if channels_last:
        reference = reference.to(memory_format=torch.channels_last)
        ours = ours.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return ours, reference, (images, targets)


def train_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, steps: int, amp: bool
) -> tuple[float, float]:
    """Run ``steps`` optimizer steps; returns (seconds, loss of the first step)."""
    images, targets = batch
    first = float("nan")
    start = time.perf_counter()
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            first = float(loss.detach())
    return time.perf_counter() - start, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round and model")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run: batch 2 at 64x64, 2 steps, 1 round"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.img_size, args.steps, args.rounds = 2, 64, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, reference, batch = build(args.batch_size, args.img_size, args.channels_last)
    opt_ours = create_optimizer_v2(ours, "adamw", lr=1e-3, weight_decay=0.05)
    opt_ref = create_optimizer_v2(reference, "adamw", lr=1e-3, weight_decay=0.05)
    # the same first step on the same batch: equal losses, and equal weights after the update
    _, loss_ours = train_steps(ours, opt_ours, batch, 1, args.amp)
    _, loss_ref = train_steps(reference, opt_ref, batch, 1, args.amp)
    print(f"first-step loss: metaformer {loss_ours:.6f}  timm {loss_ref:.6f}")
    if abs(loss_ours - loss_ref) > 1e-4 * max(1.0, abs(loss_ref)):
        print("error: the two models disagree on the first step; not timing", file=sys.stderr)
        return 1
    ours_speed, ref_speed = [], []
    for _ in range(args.rounds):
        for model, optimizer, speeds in ((ours, opt_ours, ours_speed), (reference, opt_ref, ref_speed)):
            train_steps(model, optimizer, batch, 1, args.amp)  # warm-up step, not timed
            seconds, _ = train_steps(model, optimizer, batch, args.steps, args.amp)
            speeds.append(args.steps * args.batch_size / seconds)
    ours_ips, ref_ips = statistics.median(ours_speed), statistics.median(ref_speed)
    print(
        f"poolformer_s12 training, batch {args.batch_size} at {args.img_size}x{args.img_size}, "
        f"{torch.get_num_threads()} thread(s), {args.rounds} x {args.steps} steps"
        f"{', channels_last' if args.channels_last else ''}{', bf16' if args.amp else ''}"
    )
    print(f"  metaformer {ours_ips:8.1f} images/s")
    print(f"  timm       {ref_ips:8.1f} images/s")
    print(f"  ratio metaformer/timm: {ours_ips / ref_ips:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training speed and memory: timm vs metaformer, forward + backward + AdamW step, interleaved.

Rows: timm default (NCHW), timm channels_last, ours NCHW, ours channels_last, the same with the
native pooling kernel switched off (torch ops only: what runs without a C compiler), ours as
``classify train`` runs it on CPU by default (channels_last and torch's fused AdamW), and ours with
gradient checkpointing. All start from the same weights (timm's, ours with ``final_norm="pooled"``)
with drop path and dropout off, and train on the same fixed batch, so their losses must agree: the
first-step loss difference to timm and the largest difference over all steps are printed.

Peak memory: on CPU each row runs again in a fresh subprocess (glibc set to return freed memory at
once), which resets the kernel's RSS high-water mark (``/proc/self/clear_refs``) and reports the
peak resident size over two steps (``VmHWM``) minus the resident size before them: activations,
gradients, AdamW state and workspace on top of the built model and batch. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the memory allocated before the steps.

    python benchmarks/training.py                    # poolformer_s12, batch 32
    python benchmarks/training.py --models poolformer_s12 poolformer_m36 --steps 6
    python benchmarks/training.py --quick            # smoke test
    python benchmarks/training.py --batch 16 --threads 2 --compile   # compiled peers too (minutes to start)
    python benchmarks/training.py --device cuda --batch 128 --dtype bfloat16 --compile

On CUDA, rows "ours ..., Triton" run the opt-in Triton kernels of the pooling half
(``models/kernels/triton_pool.py``, what METAFORMER_TRITON=1 switches on). ``--compile`` adds the
compiled rows: timm through ``torch.compile`` (NCHW and channels-last) and ours through the library's
route (``metaformer.compiling.compile_module``, what ``classify train --compile on`` runs; NCHW and
channels-last), on CUDA also ours Triton + torch.compile. Their first step compiles: its seconds are
printed beside the speed (Inductor's cache lives under the metaformer home, so a second run starts
warm), and "x timm CL compiled" is each row's ratio to timm channels-last compiled.
``--dtype bfloat16`` runs every row under bf16 autocast.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from metaformer.system import machine_line, paired_ratio, randomize_weights_, routes_summary

ROWS = (
    "timm (NCHW)",
    "timm channels_last",
    "ours (NCHW)",
    "ours channels_last",
    "ours channels_last, torch ops",
    "ours default (+ fused AdamW)",
    "ours + grad checkpointing",
)
CUDA_ROWS = ("ours (NCHW), Triton", "ours channels_last, Triton")
COMPILE_ROWS = (
    "timm compiled (NCHW)",
    "timm channels_last compiled",
    "ours compiled (NCHW)",
    "ours channels_last compiled",
)
COMPILED_PEER = "timm channels_last compiled"  # the ratio column's reference
CUDA_COMPILE_ROWS = ("ours (NCHW), Triton + compile",)


def rows_for(args: argparse.Namespace) -> tuple[str, ...]:
    """The rows this run times: the Triton rows only on CUDA, the compiled ones with --compile."""
    compiled = COMPILE_ROWS if args.compile else ()
    if args.device != "cuda":
        return ROWS + compiled
    return ROWS + CUDA_ROWS + compiled + (CUDA_COMPILE_ROWS if args.compile else ())


def is_compiled(row: str) -> bool:
    return row.endswith(("compiled", "compiled (NCHW)", "+ compile"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["poolformer_s12"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (interleaved; median reported)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-rows", nargs="+", help="probe the peak memory of these rows only (default: all)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16: autocast")
    p.add_argument(
        "--compile", action="store_true", help="add the torch.compile rows (minutes to start on a CPU)"
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="every weight random, layer scales near 1 (default with --quick): the loss columns then "
        "catch a broken mixer, which timm's 1e-5 layer-scale init hides",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 64x64, batch 2, 2 steps")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one row in a fresh process
    args = p.parse_args(argv)
    args.memory_batch, args.memory_img_size = args.batch, args.img_size
    if args.quick:
        args.batch, args.img_size, args.steps = 2, 64, 1
        args.threads = args.threads or 1  # tiny ops: a second thread only adds barrier waits
        args.random_weights = True
        # the memory probes at a size where activations, not AdamW's state, make the peak (at 64x64 and
        # batch 2 the optimizer step is the peak, the same with and without checkpointing)
        args.memory_batch, args.memory_img_size = 8, 96
    return args


def build_row(
    row: str, name: str, args: argparse.Namespace, timm_weights: bool = True
) -> Callable[[], float]:
    """A closure running one training step of ``row`` and returning its loss.

    ``timm_weights=False`` (memory probes) skips building the timm reference for our rows, so the
    probe's baseline holds only the model under test.
    """
    from metaformer import create_model

    torch.manual_seed(0)  # every row's weights are those of timm's model built right after this seed
    if row.startswith("timm") or timm_weights:
        import timm

        reference = timm.create_model(name, pretrained=False, num_classes=1000, drop_path_rate=0.0)
        if args.random_weights:
            randomize_weights_(reference)
    if row.startswith("timm"):
        model = reference
    else:
        model = create_model(name, final_norm="pooled", drop_path_rate=0.0, img_size=args.img_size)
        if timm_weights:
            model.load_state_dict(reference.state_dict())
            del reference
        if row == "ours + grad checkpointing":
            model.set_grad_checkpointing(True)
    channels_last = row.startswith("ours default") or "channels_last" in row or "checkpointing" in row
    model = model.to(args.device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(args.device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(args.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if row.startswith("ours default"):  # what `metaformer classify train` builds (same decay on every tensor)
        from metaformer.engine.loop import create_optimizer

        optimizer = create_optimizer(list(model.parameters()), lr=1e-3, weight_decay=0.05)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    if row.startswith("ours") and is_compiled(row) and not row.endswith("+ compile"):
        from metaformer.compiling import compile_module

        forward = compile_module(
            model, key=f"bench-train-{name}-b{args.batch}-{args.img_size}-{row}", dynamic=False
        )
    else:
        forward = torch.compile(model) if is_compiled(row) else model
    autocast = args.dtype == "bfloat16"

    def step() -> float:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=autocast):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    if row.endswith("torch ops"):
        return without_native(step)
    if "Triton" in row:
        return with_triton(step)
    return step


def with_triton(step: Callable[[], float]) -> Callable[[], float]:
    """Run ``step`` with the opt-in Triton kernels switched on."""
    from metaformer.models.kernels.triton_pool import triton_kernels

    def run() -> float:
        with triton_kernels(True):
            return step()

    return run


def without_native(step: Callable[[], float]) -> Callable[[], float]:
    """Run ``step`` with the blocks' native pooling kernel switched off."""
    from metaformer.models.kernels import native_kernels

    def run() -> float:
        with native_kernels(False):
            return step()

    return run


def _status_kib(field: str) -> int:
    """A 'VmRSS' / 'VmHWM' line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: build one row, run two steps, print its peak memory growth in MiB as JSON."""
    name, row = args.memory_probe.split("|", 1)
    step = build_row(row, name, args, timm_weights=False)
    gc.collect()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # reset the kernel's RSS high-water mark, so the peak read later covers the steps only
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
    for _ in range(2):
        step()
    if args.device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_status_kib("VmHWM") - base) / 1024
    print(json.dumps({"peak_mib": peak}))


def measure_memory(name: str, row: str, args: argparse.Namespace) -> float | None:
    command = [sys.executable, __file__, "--memory-probe", f"{name}|{row}", "--device", args.device]
    command += [
        "--batch",
        str(args.memory_batch),
        "--img-size",
        str(args.memory_img_size),
        "--dtype",
        args.dtype,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    # glibc: mmap every block over 128 KiB and trim at once, so freed memory leaves the RSS and the
    # peak counts what training itself holds (not memory the parent's allocator happened to keep)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        print(f"  memory probe for {row} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    rows = rows_for(args)
    steps = {row: build_row(row, name, args) for row in rows}
    losses: dict[str, list[float]] = {row: [] for row in rows}
    times: dict[str, list[float]] = {row: [] for row in rows}
    first_step: dict[str, float] = {}
    for row, step in steps.items():  # first step: the loss comparison, and the warm-up (and compile)
        start = time.perf_counter()
        losses[row].append(step())
        first_step[row] = time.perf_counter() - start
    for _ in range(args.steps):
        for row, step in steps.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses[row].append(step())
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[row].append(time.perf_counter() - start)
    base, channels_last = times["timm (NCHW)"], times["timm channels_last"]
    # --quick probes only the two rows of the checkpointing comparison (each probe is a new process)
    uncompiled = tuple(row for row in rows if not is_compiled(row))  # a probe would compile again
    memory_rows = ("ours channels_last", "ours + grad checkpointing") if args.quick else uncompiled
    memory_rows = args.memory_rows or memory_rows
    results = []
    for row in rows:
        t = statistics.median(times[row])
        ref = losses["timm (NCHW)"]
        speedups = [a / b for a, b in zip(base, times[row], strict=True)]
        results.append(
            {
                "model": name,
                "impl": row,
                "img_s": args.batch / t,
                "speedup": paired_ratio(base, times[row]),
                "speedup_range": (min(speedups), max(speedups)),
                "vs_channels_last": paired_ratio(channels_last, times[row]),
                "vs_compiled_peer": paired_ratio(times[COMPILED_PEER], times[row])
                if COMPILED_PEER in times
                else None,
                "compile_s": first_step[row] - t if is_compiled(row) else None,
                "first_loss": losses[row][0],
                "first_loss_diff": abs(losses[row][0] - ref[0]),
                "max_loss_diff": max(abs(a - b) for a, b in zip(losses[row], ref, strict=True)),
                "peak_mib": None
                if args.no_memory or row not in memory_rows
                else measure_memory(name, row, args),
            }
        )
    return results


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    memory = "peak RSS growth" if args.device == "cpu" else "max_memory_allocated"
    print(f"\n{results[0]['model']}: train step (fwd + bwd + AdamW), batch {args.batch}, {args.img_size}px")
    compiled = any(r["vs_compiled_peer"] is not None for r in results)
    header = (
        f"{'implementation':<32}{'img/s':>8}{'x timm':>8}{'rounds':>12}{'x timm CL':>10}"
        + (f"{'x timm CL compiled':>20}{'compile s':>11}" if compiled else "")
        + f"{'loss step 1':>13}{'|d| step 1':>12}{'max |d| all steps':>19}{memory + ' MiB':>23}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        low, high = r["speedup_range"]
        peer = ""
        if compiled:
            seconds = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
            peer = f"{r['vs_compiled_peer']:>20.2f}{seconds:>11}"
        print(
            f"{r['impl']:<32}{r['img_s']:>8.2f}{r['speedup']:>8.2f}{f'{low:.2f}-{high:.2f}':>12}"
            f"{r['vs_channels_last']:>10.2f}{peer}{r['first_loss']:>13.6f}"
            f"{r['first_loss_diff']:>12.1e}{r['max_loss_diff']:>19.1e}{mem:>23}"
        )
    by_row = {r["impl"]: r["peak_mib"] for r in results}
    full, ckpt = by_row["ours channels_last"], by_row["ours + grad checkpointing"]
    if full and ckpt:
        saved = 1 - ckpt / full
        print(
            f"gradient checkpointing: peak memory {ckpt:.0f} MiB vs {full:.0f} MiB ({saved:.0%} less; "
            f"batch {args.memory_batch}, {args.memory_img_size}px)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("training.py: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return 0
    if args.compile:
        from metaformer.compiling import enable_compile_caches

        print(f"compile cache: {enable_compile_caches()} (compile s: first step minus the median step)")
    print(machine_line(calibrate=args.device == "cpu"))
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"{args.steps} interleaved steps per row after one warm-up step; img/s: median step; x timm: "
        "median of the per-round ratios (rounds: their range); "
        f"weights: {'random (layer scales near 1)' if args.random_weights else 'timm init'}"
    )
    for name in args.models:
        print_table(bench_model(name, args), args)
    print("\n".join(routes_summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Inference speed: timm vs metaformer (plain and fast path) and onnxruntime, in one interleaved run.

For each model: timm in its default NCHW layout, timm channels_last, ours as created (NCHW), ours
through ``optimize_for_inference``, onnxruntime on our exported (folded) graph, and ``auto`` (what
eval and predict run, decided at batch 32 and batch 1 apart). With ``--compile`` (Inductor with
freezing, as PyTorch's CPU guides recommend, one static graph per batch size): timm compiled in NCHW
and in channels_last, and ours compiled (the ``compile`` backend, ``--backend compile``); the
"1st s" column is the seconds of each row's first batch-32 and batch-1 calls (for a compiled row its
compiles, cold or from Inductor's caches under the metaformer home), "x timm CL comp." the speed
against timm channels_last compiled, and "b1 x CL comp." the batch-1 latency against it (as "b1 x
timm": lower is faster). Every candidate
gets the same timm weights (ours with ``final_norm="pooled"``, timm's head), outputs are compared
with timm's before timing, and the rounds are interleaved (A B C D, A B C D, ...) so that machine
noise hits all rows alike; the medians are reported. The matmul peak (2048 x 2048, fp32) is timed in
the same rounds, so "% peak" compares like with like.

    python benchmarks/inference.py                       # the five PoolFormers, batch 32 and batch 1
    python benchmarks/inference.py --compile --models poolformer_s12 --threads 2  # + the compiled rows
    python benchmarks/inference.py --all --compile       # + convformer_s18, caformer_s18, torch.compile rows
    python benchmarks/inference.py --device cuda         # fp32 and bf16, eager and compiled
    python benchmarks/inference.py --device cuda --compile   # + torch.compile rows (Triton path too)

On CUDA the rows "ours fast path, Triton" (and "+ compile") run the opt-in Triton kernels of the
pooling half (``models/kernels/triton_pool.py``), switched on for that row only.
    python benchmarks/inference.py --quick               # smoke test (seconds)
    python benchmarks/inference.py --precisions --threads 2  # + every precision (precisions.py's rows)

With ``--precisions`` (CPU), each model's table is followed by ``benchmarks/precisions.py``'s run for
that model: our fp32/bf16/int8 defaults, onnxruntime and OpenVINO on our export, and timm ->
torch.onnx.export -> OpenVINO fp32/bf16/NNCF int8, interleaved among themselves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from metaformer.models.kernels import native_library
from metaformer.system import machine_line, paired_ratio, randomize_weights_, routes_summary

POOLFORMERS = ["poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"]
EXTRA = ["convformer_s18", "caformer_s18"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="model names (default: the five PoolFormers)")
    p.add_argument("--all", action="store_true", help="also convformer_s18 and caformer_s18")
    p.add_argument("--batch", type=int, default=32, help="throughput batch size (default 32)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--latency-runs", type=int, default=5, help="batch-1 calls per round (their mean)")
    p.add_argument(
        "--runs", type=int, help="throughput calls per round, their mean (default 1 on CPU, 20 on CUDA)"
    )
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), nargs="+", help="default: float32 on CPU, both on CUDA"
    )
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (slow to start)")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime rows")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="every weight random, layer scales near 1 (default with --quick): the rel diff column then "
        "catches a broken mixer, which timm's 1e-5 layer-scale init hides",
    )
    p.add_argument(
        "--precisions",
        action="store_true",
        help="CPU: also every precision against timm -> OpenVINO (benchmarks/precisions.py, per model)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: poolformer_s12, 64x64, batch 2, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.random_weights = True
        args.models = args.models or ["poolformer_s12"]
        args.batch, args.img_size, args.repeats, args.latency_runs = 2, 64, 1, 1
        args.threads = args.threads or 1  # tiny ops: a second thread only adds barrier waits
    if args.runs is None:  # a GPU batch takes milliseconds: average several calls per timing
        args.runs = 20 if args.device == "cuda" else 1
    if args.device == "cuda":
        args.latency_runs = max(args.latency_runs, 20)
    args.models = args.models or (POOLFORMERS + EXTRA if args.all else POOLFORMERS)
    if args.all and args.models != POOLFORMERS + EXTRA:
        args.models = list(dict.fromkeys(args.models + EXTRA))
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, runs: int = 1) -> float:
    """Mean seconds of ``runs`` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    sync(device)
    return (time.perf_counter() - start) / runs


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def matmul_peak_once(device: str, dtype: torch.dtype) -> float:
    """GFLOP/s of one 2048 x 2048 x 2048 matmul."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    a @ b
    return 2 * 2048**3 / timed(lambda: a @ b, device, runs=3) / 1e9


def without_native(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fast path with its native pooling kernel switched off (what it runs without a C compiler)."""
    from metaformer.models.kernels import native_kernels

    def run(x: torch.Tensor) -> torch.Tensor:
        with native_kernels(False):
            return model(x)

    return run


def with_triton(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model with the opt-in Triton kernels switched on (what METAFORMER_TRITON=1 does)."""
    from metaformer.models.kernels.triton_pool import triton_kernels

    def run(x: torch.Tensor) -> torch.Tensor:
        with triton_kernels(True):
            return model(x)

    return run


def build_candidates(
    name: str, args: argparse.Namespace, dtype: torch.dtype, tmp: Path
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], dict[str, str]]:
    """name -> callable(x) for every row, all holding the same (timm) weights."""
    import timm

    from metaformer import create_model, optimize_for_inference

    device = args.device
    notes: dict[str, str] = {}
    ref = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    if args.random_weights:
        randomize_weights_(ref)
    state = ref.state_dict()
    timm_cl = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    timm_cl.load_state_dict(state)
    ours = create_model(name, final_norm="pooled", img_size=args.img_size).eval()
    ours.load_state_dict(state)
    ref, timm_cl, ours = (m.to(device=device, dtype=dtype) for m in (ref, timm_cl, ours))
    timm_cl = timm_cl.to(memory_format=torch.channels_last)
    fast = optimize_for_inference(ours)

    def channels_last(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: model(x.contiguous(memory_format=torch.channels_last))

    rows: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "timm (NCHW)": ref,
        "timm channels_last": channels_last(timm_cl),
        "ours (default)": ours,
        "ours fast path": fast,
    }
    if device == "cpu" and dtype == torch.float32 and native_library() is not None:
        rows["ours fast path, torch ops only"] = without_native(fast)
    if device == "cuda":
        rows["ours fast path, Triton"] = with_triton(fast)
    if args.compile:
        rows["timm compiled (NCHW)"] = torch.compile(ref, dynamic=False)
        rows[COMPILED_PEER] = channels_last(torch.compile(timm_cl, dynamic=False))
        if device == "cpu":
            rows["ours fast path compiled (compile backend)"] = compile_backend(ours, args, dtype)
        else:
            rows["ours fast path compiled"] = optimize_for_inference(ours, compile=True)
            rows["ours fast path, Triton + compile"] = with_triton(optimize_for_inference(ours, compile=True))
    if device == "cpu" and dtype == torch.float32 and not args.no_onnx:
        try:
            import onnxruntime as ort

            from metaformer.deploy.onnx_export import export_model
        except ImportError as err:  # pragma: no cover - the export extra is not installed
            notes["onnxruntime"] = f"skipped ({err})"
        else:
            from metaformer.inference import onnxruntime_options

            # the product's options: without them onnxruntime's spinning threads slow the row after
            # its own (measured: a PyTorch batch-1 forward 39 ms instead of 23 on 2 cores)
            options = onnxruntime_options(args.threads)
            for fold, label in ((True, "onnxruntime (folded graph)"), (False, "onnxruntime (plain graph)")):
                path = tmp / f"{name}_{'folded' if fold else 'plain'}.onnx"
                export_model(
                    ours, path, img_size=(args.img_size, args.img_size), dynamic_batch=True, fold=fold
                )
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

                def run(x: torch.Tensor, session: ort.InferenceSession = session) -> torch.Tensor:
                    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])

                rows[label] = run
    if device == "cpu" and dtype == torch.float32:
        from metaformer.inference import prepare_for_inference

        size = (args.img_size, args.img_size)
        auto, chosen = {}, {}
        start = time.perf_counter()
        for batch in dict.fromkeys((args.batch, 1)):
            auto[batch], chosen[batch] = prepare_for_inference(
                ours, backend="auto", img_size=size, batch_size=batch
            )
        label = "/".join(dict.fromkeys(chosen.values()))
        rows[f"ours, eval/predict default (auto: {label})"] = by_batch(auto)
        rows[f"ours, eval/predict default (auto: {label})"].setup_s = time.perf_counter() - start  # type: ignore[attr-defined]
    return rows, notes


COMPILED_PEER = "timm channels_last compiled"


def by_batch(
    runners: dict[int, Callable[[torch.Tensor], torch.Tensor]],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One row of runners built per batch size (a compiled graph is for one): each batch to its own."""

    def run(x: torch.Tensor) -> torch.Tensor:
        return runners[x.shape[0]](x)

    return run


def compile_backend(
    ours: torch.nn.Module, args: argparse.Namespace, dtype: torch.dtype
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Ours on the compile backend, one runner per batch size, built (compiled) now, before auto, which
    then finds the compiles recorded and weighs the compile backend too; ``setup_s``: the builds'
    seconds, which the row's "1st s" adds."""
    from metaformer.deploy import build

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    size = (args.img_size, args.img_size)
    runners: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
    start = time.perf_counter()
    for batch in dict.fromkeys((args.batch, 1)):
        runners[batch] = build(
            ours, "compile", precision, img_size=size, batch_size=batch, threads=args.threads
        )
    run = by_batch(runners)
    run.setup_s = time.perf_counter() - start  # type: ignore[attr-defined]
    return run


def bench_model(name: str, args: argparse.Namespace, dtype: torch.dtype, tmp: Path) -> list[dict]:
    from metaformer import create_model
    from metaformer.complexity import count_macs

    device = args.device
    macs = count_macs(create_model(name, img_size=args.img_size), args.img_size)
    rows, notes = build_candidates(name, args, dtype, tmp)
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device, dtype)
    x1 = x32[:1].clone()
    times32: dict[str, list[float]] = {k: [] for k in rows}
    times1: dict[str, list[float]] = {k: [] for k in rows}
    peaks: list[float] = []
    first_s = {k: getattr(fn, "setup_s", 0.0) for k, fn in rows.items()}
    with torch.inference_mode():
        ref = rows["timm (NCHW)"](x32)
        diffs = {}
        for k, fn in rows.items():  # also the warm-up: the first calls, which compile a compiled row
            start = time.perf_counter()
            out = fn(x32)
            first_s[k] += time.perf_counter() - start
            diffs[k] = rel_diff(out, ref)
        for k, fn in rows.items():
            start = time.perf_counter()
            fn(x1)
            first_s[k] += time.perf_counter() - start
        for _ in range(args.repeats):
            peaks.append(matmul_peak_once(device, dtype))
            for k, fn in rows.items():
                times32[k].append(timed(lambda fn=fn: fn(x32), device, runs=args.runs))
            for k, fn in rows.items():
                times1[k].append(timed(lambda fn=fn: fn(x1), device, runs=args.latency_runs))
    peak = statistics.median(peaks)
    base32, base1 = times32["timm (NCHW)"], times1["timm (NCHW)"]
    results = []
    for k in rows:
        t32, t1 = statistics.median(times32[k]), statistics.median(times1[k])
        gflops = 2 * macs * args.batch / t32 / 1e9
        results.append(
            {
                "model": name,
                "impl": k,
                "img_s": args.batch / t32,
                "speedup": paired_ratio(base32, times32[k]),
                "vs_channels_last": paired_ratio(times32["timm channels_last"], times32[k]),
                "vs_compiled_peer": paired_ratio(times32[COMPILED_PEER], times32[k])
                if COMPILED_PEER in times32
                else None,
                "b1_vs_compiled_peer": paired_ratio(times1[k], times1[COMPILED_PEER])
                if COMPILED_PEER in times1
                else None,
                "first_s": first_s[k],
                "latency_ms": t1 * 1e3,
                "latency_ratio": paired_ratio(times1[k], base1),
                "gflops": gflops,
                # each round's matmul peak against the same round's time
                "pct_peak": 100
                * statistics.median(
                    2 * macs * args.batch / t / 1e9 / pk for t, pk in zip(times32[k], peaks, strict=True)
                ),
                "rel_diff": diffs[k],
                "peak": peak,
                "gmacs": macs / 1e9,
            }
        )
    for k, v in notes.items():
        print(f"  note: {k}: {v}", file=sys.stderr)
    return results


def print_table(results: list[dict], title: str) -> None:
    first = results[0]
    print(
        f"\n{first['model']} - {title}: {first['gmacs']:.2f} GMACs/img, "
        f"matmul peak {first['peak']:.0f} GFLOP/s (median of the same rounds)"
    )
    peer = first["vs_compiled_peer"] is not None
    header = (
        f"{'implementation':<48}{'img/s':>9}{'x timm':>8}{'x timm CL':>10}"
        + (f"{'x timm CL comp.':>16}" if peer else "")
        + f"{'b1 ms':>9}{'b1 x timm':>10}"
        + (f"{'b1 x CL comp.':>14}" if peer else "")
        + f"{'1st s':>8}{'GFLOP/s':>9}{'% peak':>8}{'max rel diff vs timm':>22}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['impl']:<48}{r['img_s']:>9.1f}{r['speedup']:>8.2f}{r['vs_channels_last']:>10.2f}"
            + (f"{r['vs_compiled_peer']:>16.2f}" if peer else "")
            + f"{r['latency_ms']:>9.1f}{r['latency_ratio']:>10.2f}"
            + (f"{r['b1_vs_compiled_peer']:>14.2f}" if peer else "")
            + f"{r['first_s']:>8.1f}{r['gflops']:>9.0f}{r['pct_peak']:>8.0f}{r['rel_diff']:>22.1e}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("inference.py: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    if args.compile:  # timm's compiled rows frozen as ours are (the compile backend sets it per call)
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
    default = ["float32"] if args.device == "cpu" else ["float32", "bfloat16"]
    dtypes = [getattr(torch, name) for name in args.dtype or default]
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(machine_line(calibrate=args.device == "cpu"))
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
        f"batch {args.batch} (throughput) and 1 (latency), {args.img_size}x{args.img_size}, "
        f"{args.repeats} interleaved rounds; img/s and ms: medians; ratios and % peak: medians of the "
        f"per-round ratios; weights: {'random (layer scales near 1)' if args.random_weights else 'timm init'}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            for name in args.models:
                title = f"{args.device} {str(dtype).removeprefix('torch.')}"
                print_table(bench_model(name, args, dtype, Path(tmp)), title)
    print("\n".join(routes_summary()))
    if args.precisions and args.device == "cpu":
        run_precisions(args)
    return 0


def run_precisions(args: argparse.Namespace) -> None:
    """precisions.py's rows for each model, with this run's settings (its own interleaved rounds: those
    rows build quantized models, which the tables above need not wait for)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import precisions

    for name in args.models:
        print(f"\n{name} - every precision (benchmarks/precisions.py)", flush=True)
        argv = ["--model", name, "--batch", str(args.batch), "--img-size", str(args.img_size)]
        argv += ["--repeats", str(args.repeats), "--latency-runs", str(args.latency_runs)]
        argv += ["--threads", str(args.threads)] if args.threads else []
        argv += ["--random-weights"] if args.random_weights else []
        if args.quick:  # its own smoke settings (more images than 2, so agreement means something)
            argv = ["--model", name, "--quick", "--threads", str(args.threads)]
        precisions.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

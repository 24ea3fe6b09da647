"""Semantic FPN on every backend and precision, and what a graph with a dynamic height and width costs.

Rows, all holding the same (random) weights and timed interleaved (the order reversed every other
round), each on one image of the size ADE20K's eval resize gives (512x672 by default):

- every backend (``deploy.build``) at every precision it runs here, on the dynamic-size graph that
  ``segment eval`` / ``predict`` use; int8 calibrated on random images (that sets the speed, not the
  accuracy: ``segment eval --precision int8`` measures that on real images);
- with ``--sizes``, onnxruntime and OpenVINO fp32 on a graph fixed to the image size against the
  dynamic one: build (export + checks) and run time, the cost behind one graph for every size.

Every row prints its one-off build time, its max difference from PyTorch fp32 relative to the largest
logit, and its pixel agreement with PyTorch fp32's label map.

    python benchmarks/segment_deploy.py --threads 2            # S12 Semantic FPN, 150 classes, 512x672
    python benchmarks/segment_deploy.py --threads 2 --sizes    # and fixed-size against dynamic graphs
    python benchmarks/segment_deploy.py --quick                # smoke test (tiny model, 64x96)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from metaformer.system import machine_line, paired_ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=150, help="segmentation classes (ADE20K 150)")
    p.add_argument("--size", type=int, nargs=2, default=[512, 672], metavar=("H", "W"))
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, help="threads for every backend (default: torch's choice)")
    p.add_argument("--calibration", type=int, default=16, help="int8 calibration images (default 16)")
    p.add_argument("--sizes", action="store_true", help="also fixed-size graphs against the dynamic one")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, 64x96, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.size, args.repeats, args.calibration = 4, [64, 96], 1, 4
        args.threads = args.threads or 1
    return args


def build_rows(
    args: argparse.Namespace,
) -> tuple[dict[str, torch.nn.Module], dict[str, float], torch.nn.Module]:
    """label -> runner, label -> build seconds, and the PyTorch model they all hold."""
    from metaformer.deploy import backend, build, candidates
    from metaformer.deploy.quantize import Calibration
    from metaformer.tasks.segment.model import SegmenterConfig, create_segmenter

    overrides = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]} if args.quick else {}
    channels = {"fpn_channels": 16, "head_channels": 8} if args.quick else {}
    model = create_segmenter(SegmenterConfig(args.classes, backbone_overrides=overrides, **channels)).eval()
    size = tuple(args.size)
    generator = torch.Generator().manual_seed(1)
    calibration = Calibration(
        [torch.rand(args.calibration, 3, *size, generator=generator)], key=f"random-{args.calibration}"
    )
    rows: dict[str, torch.nn.Module] = {}
    seconds: dict[str, float] = {}
    plan = [
        (name, precision, True) for precision in ("fp32", "bf16", "int8") for name in candidates(precision)
    ]
    if args.sizes:
        plan += [(name, "fp32", False) for name in ("onnxruntime", "openvino") if name in candidates("fp32")]
    for name, precision, dynamic in plan:
        if not dynamic and not backend(name).caches_files:
            continue
        start = time.perf_counter()
        runner = build(
            model, name, precision, img_size=size, batch_size=1, threads=args.threads, use_cache=False,
            calibration=calibration if precision == "int8" else None, dynamic_size=dynamic,
        )  # fmt: skip
        label = f"{runner.describe() if hasattr(runner, 'describe') else name}" + (
            "" if dynamic else ", fixed size"
        )
        rows[label], seconds[label] = runner, time.perf_counter() - start
        print(f"built {label} in {seconds[label]:.1f} s", flush=True)
    return rows, seconds, model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(machine_line(calibrate=True))
    h, w = args.size
    print(
        f"torch {torch.__version__}, Semantic FPN {'tiny' if args.quick else 'poolformer_s12'}, "
        f"{args.classes} classes, one {h}x{w} image, threads {torch.get_num_threads()}, "
        f"{args.repeats} interleaved rounds; "
        "ms: medians; ratios: medians of the per-round ratios; rel diff and pixel agreement: against "
        "PyTorch fp32; weights: random"
    )
    rows, seconds, model = build_rows(args)
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in rows}
    with torch.inference_mode():
        ref = model(image)
        outputs = {k: runner(image) for k, runner in rows.items()}  # also the warm-up
        for round_ in range(args.repeats):
            for k, runner in list(rows.items())[:: -1 if round_ % 2 else 1]:
                start = time.perf_counter()
                runner(image)
                times[k].append(time.perf_counter() - start)
    base = next(k for k in rows if k.startswith("torch fp32"))
    header = f"{'row':<60}{'ms':>9}{'x torch fp32':>14}{'build s':>9}{'rel diff':>10}{'pixel agree %':>15}"
    print(header)
    print("-" * len(header))
    for k in rows:
        out = torch.as_tensor(outputs[k]).float()
        diff = ((out - ref).abs().max() / ref.abs().max()).item()
        agree = 100 * (out.argmax(1) == ref.argmax(1)).float().mean().item()
        print(
            f"{k:<60}{1e3 * statistics.median(times[k]):>9.0f}{paired_ratio(times[base], times[k]):>14.2f}"
            f"{seconds[k]:>9.1f}{diff:>10.1e}{agree:>15.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

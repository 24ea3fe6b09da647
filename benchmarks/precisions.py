"""CPU inference at every precision: our backends next to what a timm user would build, in one run.

Rows, all holding the same weights and timed interleaved (A B C ..., A B C ..., the order reversed
every other round) so that a shared machine's drift hits every row alike:

- fp32: the eval/predict default (``prepare_for_inference``, auto), our fast path, onnxruntime and
  OpenVINO on our folded export, OpenVINO on timm's model exported with plain ``torch.onnx.export``;
- bf16: our fast path folded in fp32 and run in bf16, OpenVINO's bf16 on our export and on timm's
  (only where OpenVINO has native bf16), and the bf16 default (auto);
- int8: NNCF on our export run by OpenVINO, onnxruntime's QDQ file run by onnxruntime and by
  OpenVINO, NNCF on timm's export, and the int8 default (auto), all calibrated on the same images.

timm's graph reaches OpenVINO the way OpenVINO's and NNCF's guides show: ``ov.convert_model`` on the
ONNX file, which also fuses its norms and GELUs before NNCF quantizes it (our int8 rows do the same).
Every OpenVINO row names its precision hint, threads and performance hint. Each row's outputs on the
timed batch are compared with PyTorch fp32 (max difference relative to the largest logit, and top-1
agreement); ``--random-weights`` (default with ``--quick``) makes that comparison catch a broken graph.
Ratios are medians of the per-round ratios (``paired_ratio``). onnxruntime's and OpenVINO's kernels
ignore the AVX2 simulation's caps (``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``): under it their
rows still run AVX-512/VNNI code, so do not read them as an AVX2 machine's.

    python benchmarks/precisions.py --threads 2                  # S12, 224x224, batch 32 and batch 1
    python benchmarks/precisions.py --quick                      # smoke test (tiny, 64x64)
    python benchmarks/precisions.py --checkpoint runs/digits/best.safetensors   # the threshold at work

``--checkpoint`` (repeatable) runs a trained classifier instead, on its own data: calibrated on its
training images as ``classify eval --precision int8`` is, with a quarter of them held out, and each
int8 candidate (OpenVINO's NNCF model, onnxruntime's QDQ file in every setting) gets its held-out
agreement with fp32, its top-1 on the run's validation images against fp32's, and its img/s; then the
candidate ``auto`` keeps at the default threshold (99% per image), or its one-sentence refusal.
    python benchmarks/inference.py --precisions --threads 2      # the same rows, after inference.py's
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from metaformer.system import machine_line, paired_ratio, randomize_weights_


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="poolformer_s12")
    p.add_argument("--batch", type=int, default=32, help="throughput batch size (default 32)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument(
        "--repeats", type=int, help="interleaved rounds, median reported (default 5; 7 with --checkpoint)"
    )
    p.add_argument("--latency-runs", type=int, default=5, help="batch-1 calls per round (their mean)")
    p.add_argument("--threads", type=int, help="threads for every backend (default: torch's choice)")
    p.add_argument("--calibration", type=int, default=128, help="int8 calibration images (default 128)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="every weight random, layer scales near 1 (default with --quick): the diff and agreement "
        "columns then catch a broken graph, which timm's 1e-5 layer-scale init hides",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 64x64, batch 8, 1 round")
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="a trained classifier's weights (its run's config.json beside it): int8 candidates on its data",
    )
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 7 if args.checkpoint else 5
    if args.quick:
        args.batch, args.img_size, args.repeats, args.latency_runs, args.calibration = 8, 64, 1, 1, 32
        args.random_weights = True
        args.threads = args.threads or 1
    return args


def timed(fn: Callable[[], object], runs: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs


def timm_export(model: torch.nn.Module, path: Path, size: int) -> None:
    """What a timm user runs: plain ``torch.onnx.export`` of the timm model, dynamic batch, opset 17."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(1, 3, size, size),), str(path), dynamo=False, input_names=["images"],
            output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )  # fmt: skip


def build_rows(
    args: argparse.Namespace, tmp: Path
) -> tuple[dict[str, Callable], dict[str, str], torch.nn.Module]:
    """label -> runner for every row, notes naming how each OpenVINO row runs, and the PyTorch fp32 model
    they all hold the weights of."""
    import nncf
    import openvino as ov
    import timm

    from metaformer import create_model
    from metaformer.deploy import build, prepare_for_inference
    from metaformer.deploy.backend_openvino import OpenVinoModel
    from metaformer.deploy.quantize import Calibration
    from metaformer.deploy.runtimes import openvino_core, openvino_native_bf16

    ref = timm.create_model(args.model, pretrained=False, num_classes=1000).eval()
    if args.random_weights:
        randomize_weights_(ref)
    ours = create_model(args.model, final_norm="pooled", img_size=args.img_size).eval()
    ours.load_state_dict(ref.state_dict())
    size, threads = (args.img_size, args.img_size), args.threads
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.calibration, 3, *size, generator=generator)
    calibration = Calibration([images[i : i + 32] for i in range(0, len(images), 32)], key="benchmark")
    notes: dict[str, str] = {}
    rows: dict[str, Callable] = {}

    def add(label: str, runner: torch.nn.Module) -> None:
        described = getattr(runner, "describe", None)
        rows[label] = runner
        if described is not None:
            notes[label] = described()

    runner, name = prepare_for_inference(ours, img_size=size, batch_size=args.batch, threads=threads)
    add(f"fp32 default (auto: {name})", runner)
    add("fp32 ours fast path", build(ours, "torch", "fp32", img_size=size, threads=threads))
    add("fp32 onnxruntime, our export", build(ours, "onnxruntime", "fp32", img_size=size, threads=threads))
    add("fp32 OpenVINO, our export", build(ours, "openvino", "fp32", img_size=size, threads=threads))
    timm_onnx = tmp / "timm.onnx"
    timm_export(ref, timm_onnx, args.img_size)
    timm_ov = ov.convert_model(str(timm_onnx))
    add("fp32 OpenVINO, timm export", OpenVinoModel(timm_ov, "fp32", threads=threads))
    add("bf16 ours fast path", build(ours, "torch", "bf16", img_size=size, threads=threads))
    if openvino_native_bf16():
        add("bf16 OpenVINO, our export", build(ours, "openvino", "bf16", img_size=size, threads=threads))
        add("bf16 OpenVINO, timm export", OpenVinoModel(timm_ov, "bf16", threads=threads))
    else:
        notes["bf16 OpenVINO"] = "skipped: OpenVINO has no native bf16 on this CPU"
    runner, name = prepare_for_inference(
        ours, precision="bf16", img_size=size, batch_size=args.batch, threads=threads
    )
    add(f"bf16 default (auto: {name})", runner)
    int8 = {"img_size": size, "threads": threads, "calibration": calibration}
    add("int8 OpenVINO (NNCF), our export", build(ours, "openvino", "int8", **int8))
    ort_int8 = build(ours, "onnxruntime", "int8", **int8)
    add("int8 onnxruntime (QDQ), our export", ort_int8)
    notes["int8 onnxruntime (QDQ), our export"] += ", " + ", ".join(
        f"{name}{'*' if name == ort_int8.check['quantization'] else ''} {100 * (c['agreement'] or 0):.0f}% "
        f"{c['ms_per_batch']:.0f} ms"
        for name, c in ort_int8.check["settings"].items()
    )  # every QDQ setting measured on the held-out images (* kept)
    from metaformer.deploy.quantize import quantize_qdq

    qdq = tmp / "ours.int8.onnx"
    export_path = tmp / "ours.onnx"
    from metaformer.deploy.onnx_export import export_model

    export_model(ours, export_path, img_size=size, dynamic_batch=True)
    quantize_qdq(export_path, qdq, calibration)
    add(
        "int8 OpenVINO running the QDQ file",
        OpenVinoModel(openvino_core().read_model(str(qdq)), "int8", threads=threads),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        timm_int8 = nncf.quantize(
            ov.convert_model(str(timm_onnx)), nncf.Dataset(calibration.images()),
            preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(calibration.images()),
        )  # fmt: skip
    add("int8 OpenVINO (NNCF), timm export", OpenVinoModel(timm_int8, "int8", threads=threads))
    # random weights on random images: no agreement figure means anything here, so no threshold
    runner, name = prepare_for_inference(
        ours, precision="int8", img_size=size, batch_size=args.batch, threads=threads,
        calibration=calibration, min_agreement=0.0,
    )  # fmt: skip
    add(f"int8 default (auto: {name})", runner)
    return rows, notes, ours


def trained_table(checkpoint: str, threads: int | None, batch: int, rounds: int = 7) -> None:
    """The int8 candidates on a trained checkpoint, calibrated and held out on its own training data."""
    from metaformer.data.sources import classification_splits
    from metaformer.data.transforms import eval_transform_from_preprocessing
    from metaformer.deploy import build, prepare_for_inference
    from metaformer.deploy.backend_onnxruntime import OnnxRuntimeModel
    from metaformer.deploy.base import check_int8
    from metaformer.deploy.calibration import calibration_set, transform_key
    from metaformer.deploy.onnx_export import export_model
    from metaformer.deploy.quantize import QDQ_SETTINGS, quantize_qdq
    from metaformer.engine.state import read_run_config
    from metaformer.errors import ExportError
    from metaformer.tasks.classify.loading import load_classifier

    model, _, preproc = load_classifier(checkpoint)
    size = int(preproc["input_size"][-1])
    transform = eval_transform_from_preprocessing(preproc)
    calibration = calibration_set(checkpoint, None, transform, transform_key(preproc, size))
    config = read_run_config(checkpoint) or {}
    split = float(config.get("val_split") or 0.1)
    val = classification_splits(
        config.get("data"), img_size=size, val_transform=transform, val_split=split, only="val"
    )[1]
    xs = torch.stack([val[i][0] for i in range(len(val))])
    ys = torch.tensor([int(val[i][1]) for i in range(len(val))])
    x = xs[:batch]

    def top1(fn: Callable) -> float:
        chunks = [fn(xs[i : i + 64]).argmax(1) for i in range(0, len(xs), 64)]
        return 100 * torch.cat(chunks).eq(ys).float().mean().item()

    def speeds(runners: dict[str, Callable]) -> dict[str, float]:
        """img/s of each runner: the median of ``rounds`` interleaved rounds, each at least 0.2 s of calls (a
        batch of small images takes about a millisecond, too short to time one by one)."""
        calls = {}
        for name, fn in runners.items():
            fn(x)
            calls[name] = max(1, math.ceil(0.2 / timed(lambda fn=fn: fn(x), 3)))
        times: dict[str, list[float]] = {name: [] for name in runners}
        for round_ in range(rounds):
            for name, fn in list(runners.items())[:: -1 if round_ % 2 else 1]:
                times[name].append(timed(lambda fn=fn: fn(x), calls[name]))
        return {name: len(x) / statistics.median(t) for name, t in times.items()}

    fast = build(model, "torch", "fp32", img_size=(size, size), batch_size=batch, threads=threads)
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        base = top1(fast)
        rows: dict[str, tuple[dict, Callable]] = {}
        onnx_path = Path(tmp) / "model.onnx"
        export_model(model, onnx_path, img_size=(size, size), dynamic_batch=True)
        for setting in QDQ_SETTINGS:
            qdq = Path(tmp) / f"{setting}.onnx"
            quantize_qdq(onnx_path, qdq, calibration, setting)
            runner = OnnxRuntimeModel(qdq, threads=threads, precision="int8")
            rows[f"onnxruntime QDQ {setting}"] = (check_int8(runner, model, calibration), runner)
        nncf = build(model, "openvino", "int8", img_size=(size, size), batch_size=batch, threads=threads,
                     calibration=calibration)  # fmt: skip
        rows["OpenVINO NNCF"] = (nncf.check, nncf)
        try:
            auto, auto_name = prepare_for_inference(
                model, precision="int8", img_size=(size, size), batch_size=batch, threads=threads,
                calibration=calibration,
            )  # fmt: skip
        except ExportError as error:
            auto, refusal = None, str(error)
        timed_rows = {"fp32 fast path": fast, **{name: runner for name, (_, runner) in rows.items()}}
        speed = speeds({**timed_rows, **({"auto": auto} if auto is not None else {})})
        print(
            f"\n{checkpoint}: {len(xs)} validation images, fp32 top-1 {base:.2f}%, "
            f"fast path {speed['fp32 fast path']:.0f} img/s"
        )
        print(f"{'int8 candidate':<36}{'held-out agreement':>22}{'top-1':>8}{'drop':>7}{'img/s':>8}")
        for name, (check, runner) in rows.items():
            accuracy = top1(runner)
            agreement = f"{100 * check['agreement']:.1f}% of {check['images']}"
            print(f"{name:<36}{agreement:>22}{accuracy:>8.2f}{base - accuracy:>7.2f}{speed[name]:>8.0f}")
        if auto is None:
            print(f"auto at the default threshold: refused: {refusal}")
            return
        threshold = auto.choice["min_agreement"]
        passing = [name for name, (check, _) in rows.items() if check["agreement"] >= threshold]
        fastest = max(passing, key=speed.__getitem__) if passing else None
        setting = auto.check.get("quantization")
        print(
            f"auto at the default threshold ({100 * threshold:g}%): {auto_name}"
            f"{f' ({setting})' if setting else ''}, {speed['auto']:.0f} img/s"
            + (f", {speed['auto'] / speed[fastest]:.2f}x the fastest candidate at or above it ({fastest})"
               if fastest else "")
            + f"; dropped: {auto.choice['dropped'] or 'none'}"
        )  # fmt: skip


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, top-1 agreement in %) of a row's logits against PyTorch fp32's."""
    out, ref = torch.as_tensor(out).float(), ref.float()
    diff = ((out - ref).abs().max() / ref.abs().max()).item()
    return diff, 100 * (out.argmax(1) == ref.argmax(1)).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    print(machine_line(calibrate=True))
    if args.checkpoint:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}")
        for checkpoint in args.checkpoint:
            trained_table(checkpoint, args.threads, args.batch, args.repeats)
        return 0
    weights = "random (layer scales near 1)" if args.random_weights else "timm init"
    print(
        f"torch {torch.__version__}, {args.model}, threads {torch.get_num_threads()}, batch {args.batch} "
        f"(throughput) and 1 (latency), {args.img_size}x{args.img_size}, {args.repeats} interleaved rounds; "
        "img/s and ms: medians; ratios: medians of the per-round ratios; rel diff and agreement: against "
        f"PyTorch fp32 on the batch; weights: {weights}"
    )
    print(
        "note: int8 rows hold random weights and random calibration images, so the int8 default (auto) "
        "runs with min_agreement=0 (no threshold on agreement with fp32); onnxruntime's note lists each QDQ "
        "setting's held-out agreement and batch time (* kept)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rows, notes, model = build_rows(args, Path(tmp))
        print(f"built every row in {time.perf_counter() - start:.0f} s (exports, quantization, checks)")
        x32 = torch.randn(
            args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0)
        )
        x1 = x32[:1].clone()
        t32: dict[str, list[float]] = {k: [] for k in rows}
        t1: dict[str, list[float]] = {k: [] for k in rows}
        with torch.inference_mode():
            ref = model(x32)
            checks = {k: compare(fn(x32), ref) for k, fn in rows.items()}  # also the warm-up
            for fn in rows.values():  # (first calls measure the fast path's own routes)
                fn(x1)
            for round_ in range(args.repeats):
                order = list(rows.items())[:: -1 if round_ % 2 else 1]
                for k, fn in order:
                    t32[k].append(timed(lambda fn=fn: fn(x32)))
                for k, fn in order:
                    t1[k].append(timed(lambda fn=fn: fn(x1), args.latency_runs))
    default = next(k for k in rows if k.startswith("fp32 default"))
    header = (
        f"{'row':<44}{'img/s':>9}{'x fp32 default':>16}{'b1 ms':>9}{'b1 x fp32 default':>19}"
        f"{'rel diff':>10}{'top-1 agree %':>15}  runs with"
    )
    print(header)
    print("-" * (len(header) + 30))
    for k in rows:
        speed, ratio = args.batch / statistics.median(t32[k]), paired_ratio(t32[default], t32[k])
        latency, latency_ratio = statistics.median(t1[k]) * 1e3, paired_ratio(t1[k], t1[default])
        diff, agree = checks[k]
        print(
            f"{k:<44}{speed:>9.1f}{ratio:>16.2f}{latency:>9.1f}{latency_ratio:>19.2f}{diff:>10.1e}{agree:>15.1f}"
            f"  {notes.get(k, '')}"
        )
    pairs = [
        ("fp32 default", "fp32 OpenVINO, timm export"),
        ("bf16 default", "bf16 OpenVINO, our export"),
        ("bf16 default", "fp32 default"),
        ("int8 default", "fp32 default"),
        ("int8 default", "int8 OpenVINO (NNCF), timm export"),
    ]
    print("\nratios (throughput, batch 1 latency as a fraction of the second row's):")
    for a, b in pairs:
        ka = next((k for k in rows if k.startswith(a)), None)
        kb = next((k for k in rows if k.startswith(b)), None)
        if ka and kb:
            print(
                f"  {ka} vs {kb}: {paired_ratio(t32[kb], t32[ka]):.2f}x throughput, "
                f"batch-1 latency {paired_ratio(t1[ka], t1[kb]):.2f}x"
            )
    for k, v in notes.items():
        if k not in rows:
            print(f"  note: {k}: {v}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

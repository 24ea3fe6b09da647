"""The command line: parse flags, call one library function, map exceptions to exit codes.

The only module that prints errors or picks exit codes. Every command group adds its parser in an
``add_<group>_parser`` function, so tests can build arguments without a shell.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from metaformer.errors import MetaformerError, from_worker

logger = logging.getLogger("metaformer")


def configure_logging(debug: bool = False) -> None:
    rank0 = _rank() == 0
    level = logging.DEBUG if debug else (logging.INFO if rank0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    return common


def _img_size(values: Sequence[int] | None) -> tuple[int, int]:
    if not values:
        return (224, 224)
    if len(values) > 2:
        from metaformer.errors import ConfigError

        raise ConfigError(f"--img-size takes H or H W, got {len(values)} values")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


# --------------------------------------------------------------------------- models / info
def cmd_models(args: argparse.Namespace) -> int:
    from metaformer.report import model_table

    rows = model_table(args.pattern, with_macs=not args.no_macs)
    if not rows:
        raise MetaformerError(f"no model matches '{args.pattern}'; run `metaformer models` to list them all")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.markdown:
        print("| model | params (M) | GMACs @224 | paper params (M) | paper GMACs | paper top-1 |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            keys = ("params_m", "gmacs", "paper_params_m", "paper_gmacs", "paper_top1")
            cells = [row[k] for k in keys]
            text = ["" if v is None else f"{v:.2f}" if i < 2 else f"{v:g}" for i, v in enumerate(cells)]
            print(f"| {row['model']} | " + " | ".join(text) + " |")
        return 0
    header = f"{'model':<26}{'params (M)':>12}{'GMACs@224':>11}{'paper top-1':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        macs = "" if row["gmacs"] is None else f"{row['gmacs']:.2f}"
        top1 = "" if row["paper_top1"] is None else f"{row['paper_top1']:.1f}"
        print(f"{row['model']:<26}{row['params_m']:>12.2f}{macs:>11}{top1:>13}")
    return 0


def cmd_system(args: argparse.Namespace) -> int:
    from metaformer.models.hardware import caps_text
    from metaformer.system import REFERENCE_GFLOPS, system_report

    report = system_report(probe=args.probe or not _routes_known())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"cpu          {report['cpu']}")
    cap = caps_text(report["onednn_max_isa"], report["mkl_max_isa"])
    print(f"isa          ATen {report['aten_isa']}{cap}; {' '.join(report['extensions']) or '-'}")
    print(f"native bf16  {'yes' if report['native_bf16'] else 'no (emulated: --amp auto stays fp32)'}")
    print(
        f"calibrate    {report['fp32_gflops']:.0f} GFLOP/s 2-thread fp32 matmul, "
        f"factor {report['factor']:.2f} (reference: 2-core AVX2, {REFERENCE_GFLOPS:.0f} GFLOP/s)"
    )
    print(
        f"torch        {report['torch']}, {report['threads']} threads; "
        f"routes cached per CPU {report['signature']}"
    )
    print(f"  {'route':<16}{'shape class':<52}{'choice':<12}measured (ms)")
    for decision in report["routes"]:
        times = ", ".join(
            f"{k} {v:.3g}" for k, v in sorted(decision["times_ms"].items(), key=lambda kv: kv[1])
        )
        source = "" if decision["source"] == "probe" else f" [{decision['source']}]"
        print(
            f"  {decision['route']:<16}{decision['shape_class']:<52}{decision['choice'] + source:<12}{times}"
        )
    return 0


def _routes_known() -> bool:
    from metaformer.models import routes

    return bool(routes.decisions())


def cmd_info(args: argparse.Namespace) -> int:
    from metaformer.report import model_info

    if args.system:
        return cmd_system(args)
    if args.name is None:
        from metaformer.errors import ConfigError

        raise ConfigError("info needs a model name (e.g. `metaformer info poolformer_s12`) or --system")
    info = model_info(args.name, _img_size(args.img_size))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model']}  ({info['family']}), input {info['img_size'][0]}x{info['img_size'][1]}")
    print(f"  params: {info['params']:,}  ({info['params'] / 1e6:.2f} M)")
    print(f"  MACs:   {info['macs'] / 1e9:.3f} G")
    if info["paper_top1"] is not None:
        print(f"  paper ImageNet-1K top-1: {info['paper_top1']}")
    print(f"  {'stage':<7}{'mixer':<13}{'norm':<19}{'depth':>6}{'output shape':>22}{'stride':>8}")
    for stage in info["stages"]:
        shape = "x".join(str(s) for s in stage["output_shape"])
        print(
            f"  {stage['index']:<7}{stage['mixer']:<13}{stage['norm']:<19}{stage['depth']:>6}"
            f"{shape:>22}{stage['stride']:>8}"
        )
    return 0


def add_model_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("models", parents=[common], help="list the models with params, GMACs and paper top-1")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'poolformer_*'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (the README's)")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (faster)")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser(
        "info",
        parents=[common],
        help="per-stage output shapes, params and MACs of one model; --system: this machine and its routes",
    )
    p.add_argument("name", nargs="?")
    p.add_argument(
        "--system",
        action="store_true",
        help="print the CPU, its ISA, native bf16, the calibrate factor and every route chosen here",
    )
    p.add_argument(
        "--probe", action="store_true", help="with --system: measure the routes on PoolFormer-S12 now"
    )
    p.add_argument("--img-size", type=int, nargs="+", metavar=("H", "W"), help="input size (default 224 224)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)


# --------------------------------------------------------------------------- entry point
class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it and the help to read, not the whole usage block
    (the train commands' usage runs to dozens of lines and buries the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog="metaformer",
        description="MetaFormer vision backbones: models, weights, training, detection, segmentation.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_model_parsers(sub, common)
    add_weights_parsers(sub, common)
    add_classify_parsers(sub, common)
    add_ablate_parsers(sub, common)
    add_detect_parsers(sub, common)
    add_segment_parsers(sub, common)
    add_export_parsers(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(debug=args.debug)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("metaformer: interrupted", file=sys.stderr)
        return 130
    except Exception as caught:  # noqa: BLE001 - the one catch-all, at the boundary
        if args.debug:
            raise
        err = from_worker(caught)  # found in a DataLoader worker: the worker's own sentence
        if isinstance(err, (MetaformerError, OSError)):
            print(f"metaformer: error: {err}", file=sys.stderr)
        else:
            first = next((line for line in str(err).splitlines() if line.strip()), "")
            print(
                f"metaformer: error: {type(err).__name__}: {first} (rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


# --------------------------------------------------------------------------- weights (convert / download)
def cmd_convert(args: argparse.Namespace) -> int:
    from metaformer.weights import convert_checkpoint

    name = convert_checkpoint(args.src, args.dst, model_name=args.model, to=args.to)
    kind = "config.json + model.safetensors" if args.to == "folder" else "safetensors"
    print(f"wrote {args.dst} ({name}, {kind})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from metaformer.weights import download_weights

    path = download_weights(args.name, cache_dir=args.cache_dir, progress=sys.stderr.isatty())
    print(path)
    return 0


def add_weights_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="turn an official, timm, transformers or OpenMMLab checkpoint into metaformer safetensors",
    )
    p.add_argument(
        "src", help="checkpoint file (.pth, .pth.tar, .bin or .safetensors) or save_pretrained folder"
    )
    p.add_argument("dst", help="output .safetensors file, or folder with --to folder")
    p.add_argument("--model", help="model name (detected from the tensor shapes when omitted)")
    p.add_argument(
        "--to",
        choices=("file", "folder"),
        default="file",
        help="write one safetensors file (default) or a hub-style folder (config.json + model.safetensors)",
    )
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("download", parents=[common], help="download released weights into the cache")
    p.add_argument("name", help="model name or weights tag, e.g. poolformer_s12 or poolformer_s12.sail_in1k")
    p.add_argument("--cache-dir", help="cache folder (default $METAFORMER_HOME or ~/.cache/metaformer)")
    p.set_defaults(handler=cmd_download)


# --------------------------------------------------------------------------- ablate
def cmd_ablate(args: argparse.Namespace) -> int:
    from metaformer.tasks.ablate import AblationConfig, import_mixer, run_ablation

    extra = tuple(import_mixer(spec) for spec in args.mixer or ())
    flags = {
        "recipe": args.recipe,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "limit_train": args.limit_train,
        "limit_val": args.limit_val,
    }
    config = AblationConfig(
        study=args.study,
        output=args.output,
        data=args.data,
        epochs=args.epochs,
        seeds=args.seeds,
        jobs=args.jobs,
        depths=tuple(args.depths),
        dims=tuple(args.dims),
        extra_mixers=extra,
        only=tuple(args.only or ()),
        train_options={key: value for key, value in flags.items() if value is not None},
    )
    result = run_ablation(config)
    print(result.report.read_text(), end="")
    trained, skipped = len(result.trained), len(result.skipped)
    print(f"\nwrote {result.report} and {result.plot} ({trained} cells trained, {skipped} already done)")
    return 0


def add_ablate_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from metaformer.tasks.ablate import DEFAULT_DEPTHS, DEFAULT_DIMS, DEFAULT_EPOCHS, STUDY_NAMES

    p = sub.add_parser(
        "ablate",
        parents=[common],
        help="train the paper's Table 5 ablations (mixers, pool sizes, norms, activations, hybrids)",
        description="Each (variant, seed) is one training run in OUTPUT/runs/; finished runs are never "
        "re-run, so rerunning the command resumes an interrupted study. Writes OUTPUT/ablation.md and .png.",
    )
    p.add_argument(
        "--study", choices=STUDY_NAMES, default="mixers", help="which Table 5 block (default mixers)"
    )
    p.add_argument("--data", help="ImageFolder root with train/ and val/ (default: the embedded digits)")
    p.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs per run (default {DEFAULT_EPOCHS})"
    )
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant: 0..K-1 (default 2)")
    p.add_argument("--output", default="ablation", help="study folder (default ./ablation)")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel, each with cores/N threads (default 1)"
    )
    p.add_argument(
        "--depths", type=int, nargs=4, default=DEFAULT_DEPTHS, metavar="D", help="blocks per stage"
    )
    p.add_argument(
        "--dims",
        type=int,
        nargs=4,
        default=DEFAULT_DIMS,
        metavar="C",
        help="widths per stage (default %(default)s; 64 128 320 512 is the real S12)",
    )
    p.add_argument(
        "--mixer",
        action="append",
        metavar="NAME=module.path:Class",
        help="add your own token mixer to the mixers study (repeatable)",
    )
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these rows, e.g. baseline relu")
    p.add_argument(
        "--recipe", choices=("paper", "small"), help="training preset for every run (see classify train)"
    )
    p.add_argument("--img-size", type=int, metavar="PX", help="training input size (digits 32, folders 224)")
    p.add_argument("--batch-size", type=int, metavar="N", help="batch size (default: the recipe's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's, scaled by batch size)")
    p.add_argument(
        "--limit-train", type=int, metavar="N", help="train each run on a seeded subset of N images"
    )
    p.add_argument("--limit-val", type=int, metavar="N", help="validate on a seeded subset of N images")
    p.set_defaults(handler=cmd_ablate)


# --------------------------------------------------------------------------- classify train / eval / predict
def _classify_train_config(args: argparse.Namespace) -> Any:
    from metaformer.errors import ConfigError
    from metaformer.tasks.classify import TrainConfig

    model_kwargs: dict[str, Any] = {}
    if args.model_kwargs:
        try:
            model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"--model-kwargs is not valid JSON ({err}); e.g. '{{\"depths\": [1, 1, 1, 1]}}'"
            ) from None
        if not isinstance(model_kwargs, dict):
            raise ConfigError("--model-kwargs must be a JSON object, e.g. '{\"depths\": [1, 1, 1, 1]}'")
    fields = {name: getattr(args, name) for name in _TRAIN_FLAGS}
    for name in ("opt_betas", "scale", "ratio", "mean", "std"):
        if fields[name] is not None:
            fields[name] = tuple(fields[name])
    return TrainConfig(
        model=args.model,
        data=args.data,
        recipe=args.recipe,
        output=args.output,
        model_kwargs=model_kwargs,
        channels_last=args.channels_last,
        num_workers=args.workers,
        init_checkpoint=args.init_checkpoint,
        pretrained=args.pretrained,
        limit_train=args.limit_train,
        limit_val=args.limit_val,
        verify_images=not args.no_verify_images,
        resume=args.resume,
        overwrite=args.overwrite,
        stop_after_epoch=args.stop_after_epoch,
        eval_every=args.eval_every,
        device=args.device,
        progress=args.progress,
        **fields,
    )


def cmd_classify_train(args: argparse.Namespace) -> int:
    from metaformer.tasks.classify import train_classifier

    summary = train_classifier(_classify_train_config(args))
    if _rank() == 0:
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            best = summary["best_top1"]
            best_text = "n/a" if best is None else f"{best:.2f}%"
            print(
                f"best top-1 {best_text} at epoch {summary['best_epoch']} of {summary['epochs']}; "
                f"run folder {summary['output']}"
            )
    return 0


def cmd_classify_eval(args: argparse.Namespace) -> int:
    from metaformer.tasks.classify import EvalConfig, evaluate_classifier

    result = evaluate_classifier(
        EvalConfig(
            checkpoint=args.checkpoint,
            model=args.model,
            pretrained=args.pretrained,
            data=args.data,
            batch_size=args.batch_size,
            num_workers=args.workers,
            img_size=args.img_size,
            crop_pct=args.crop_pct,
            device=args.device,
            amp=args.amp,
            channels_last=args.channels_last,
            confusion_png=args.confusion,
            limit=args.limit,
            progress=args.progress,
            backend=args.backend,
        )
    )
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(f"{result['model']} on {result['data']}: {result['images']} images")
    print(f"  top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}")
    print(
        f"  {result['images_per_s']:.1f} images/s ({result['backend']}); "
        f"confusion matrix: {result['confusion_png']}"
    )
    if result["skipped_images"]:
        print(f"  skipped {result['skipped_images']} unreadable image(s)")
    return 0


def cmd_classify_predict(args: argparse.Namespace) -> int:
    from metaformer.tasks.classify import PredictConfig, predict

    results = predict(
        PredictConfig(
            inputs=args.inputs,
            checkpoint=args.checkpoint,
            model=args.model,
            pretrained=args.pretrained,
            topk=args.topk,
            cam=args.cam,
            batch_size=args.batch_size,
            device=args.device,
            backend=args.backend,
        )
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for item in results:
        if "error" in item:
            print(f"{item['path']}: skipped ({item['error']})")
            continue
        ranked = ", ".join(f"{p['class']} {100 * p['probability']:.1f}%" for p in item["predictions"])
        print(f"{item['path']}: {ranked}")
        if "cam" in item:
            cam = item["cam"]
            print(f"  Grad-CAM for '{cam['class']}' (stage {cam['stage']}): {cam['path']}")
    return 0


# dest -> (type, nargs, metavar, help); None values mean "from the recipe".
_TRAIN_FLAGS: dict[str, tuple[Any, Any, str | None, str]] = {
    "epochs": (int, None, "N", "epochs (paper 300, small 12)"),
    "batch_size": (int, None, "N", "images per process per step (paper 128, small 64)"),
    "lr": (float, None, "LR", "peak learning rate (default: lr-base x global batch / lr-base-batch)"),
    "lr_base": (float, None, "LR", "lr at the reference batch (paper 1e-3 per 1024, small 2e-3 per 64)"),
    "lr_base_batch": (int, None, "N", "reference global batch for lr scaling"),
    "weight_decay": (
        float,
        None,
        "WD",
        "AdamW weight decay, not applied to norms, biases, layer scales (0.05)",
    ),
    "opt": (str, None, "NAME", "timm optimizer name (adamw; lamb for CAFormer in the baselines paper)"),
    "opt_eps": (float, None, "EPS", "optimizer epsilon (1e-8)"),
    "opt_betas": (float, 2, ("B1", "B2"), "optimizer betas (0.9 0.999)"),
    "sched": (str, None, "NAME", "timm scheduler name (cosine)"),
    "warmup_epochs": (int, None, "N", "linear warmup epochs (paper 5, small 1)"),
    "warmup_lr": (float, None, "LR", "lr at the start of warmup (paper 1e-6)"),
    "min_lr": (float, None, "LR", "cosine floor (1e-5)"),
    "label_smoothing": (float, None, "P", "label smoothing (0.1)"),
    "mixup": (float, None, "ALPHA", "mixup alpha, 0 = off (paper 0.8, small 0)"),
    "cutmix": (float, None, "ALPHA", "cutmix alpha, 0 = off (paper 1.0, small 0)"),
    "mixup_prob": (float, None, "P", "probability of mixing a batch (1.0)"),
    "mixup_switch_prob": (float, None, "P", "probability of cutmix instead of mixup (0.5)"),
    "mixup_mode": (str, None, "MODE", "batch, pair or elem (batch)"),
    "auto_augment": (str, None, "POLICY", "timm RandAugment string, or 'none' (paper rand-m9-mstd0.5-inc1)"),
    "re_prob": (float, None, "P", "random erasing probability (paper 0.25, small 0)"),
    "re_mode": (str, None, "MODE", "random erasing fill (pixel)"),
    "scale": (float, 2, ("LOW", "HIGH"), "random-resized-crop area range (paper 0.08 1, small 0.8 1)"),
    "ratio": (float, 2, ("LOW", "HIGH"), "random-resized-crop aspect range (paper 0.75 1.33)"),
    "hflip": (float, None, "P", "horizontal flip probability (paper 0.5, small 0)"),
    "train_interpolation": (str, None, "MODE", "bilinear, bicubic or random (paper random)"),
    "interpolation": (str, None, "MODE", "eval resize interpolation (bicubic)"),
    "mean": (float, 3, ("R", "G", "B"), "normalisation mean (ImageNet)"),
    "std": (float, 3, ("R", "G", "B"), "normalisation std (ImageNet)"),
    "img_size": (int, None, "PX", "input size (embedded digits 32, folders 224)"),
    "crop_pct": (float, None, "F", "eval centre-crop fraction (paper 0.9 for S, 0.95 for M; small 1.0)"),
    "drop_path_rate": (float, None, "P", "stochastic depth (paper: per model, S12 0.1; small 0)"),
    "head_dropout": (float, None, "P", "classifier dropout (0; CAFormer-S36+ in the paper recipe 0.4-0.5)"),
    "ema_decay": (float, None, "D", "keep a timm ModelEmaV3 with this decay, e.g. 0.9999 (off)"),
    "clip_grad": (float, None, "NORM", "clip the gradient norm (off)"),
    "accum_steps": (int, None, "N", "gradient accumulation steps (1)"),
    "amp": (str, None, "MODE", "off, auto, bf16 or fp16 (auto: bf16 where native, else off)"),
    "seed": (int, None, "N", "random seed (paper 42, small 0)"),
}


def _add_backend_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "onnxruntime"),
        default="auto",
        help="inference runtime: torch (our fast path), onnxruntime (exported graph, CPU, fp32), or auto: "
        "the one measured faster here (default)",
    )


def _add_channels_last_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format (default: on for CPU, where it is faster; off for CUDA)",
    )


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for dest, (kind, nargs, metavar, text) in _TRAIN_FLAGS.items():
        p.add_argument(
            "--" + dest.replace("_", "-"), dest=dest, type=kind, nargs=nargs, metavar=metavar, help=text
        )
    p.add_argument(
        "--sched-on-steps",
        dest="sched_on_steps",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update the lr every optimizer step instead of every epoch (paper: per epoch; small: per step)",
    )


def add_classify_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser(
        "classify",
        parents=[common],
        help="train, evaluate and run image classifiers",
        description="Image classification. `metaformer classify train` with no options trains "
        "poolformer_s12 on the embedded digits data set.",
    )
    actions = group.add_subparsers(dest="classify_command", metavar="ACTION")
    actions.required = True

    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: only when stderr is a terminal)",
    )
    progress.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")

    p = actions.add_parser(
        "train",
        parents=[common, progress],
        help="train or fine-tune a classifier",
        description="Train a classifier. Flags left out come from --recipe (paper: the PoolFormer "
        "ImageNet recipe, default with --data; small: the short recipe the default digits run uses). The "
        "resolved settings are saved as config.json in the run folder. Under `torchrun --nproc_per_node=N "
        "-m metaformer classify train` it trains data-parallel.",
    )
    p.add_argument("--model", default="poolformer_s12", help="model name (`metaformer models` lists them)")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="ImageFolder tree DIR/train/<class>/*, DIR/val/<class>/* (default: the embedded digits)",
    )
    p.add_argument(
        "--recipe", choices=("paper", "small"), help="hyperparameter preset (paper with --data, else small)"
    )
    p.add_argument("--output", metavar="DIR", help="run folder (default runs/classify/MODEL-TIMESTAMP)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run files in --output")
    p.add_argument(
        "--init-checkpoint",
        metavar="PATH",
        help="start from these weights (official, timm or metaformer; another class count "
        "re-initialises only the classifier)",
    )
    p.add_argument("--pretrained", action="store_true", help="start from the released ImageNet weights")
    p.add_argument("--model-kwargs", metavar="JSON", help="model overrides, e.g. '{\"depths\": [1,1,1,1]}'")
    _add_channels_last_flag(p)
    p.add_argument(
        "--workers", type=int, metavar="N", help="data-loading processes (digits 0, folders up to 8)"
    )
    p.add_argument("--limit-train", type=int, metavar="N", help="train on a seeded random subset of N images")
    p.add_argument(
        "--limit-val", type=int, metavar="N", help="validate on a seeded random subset of N images"
    )
    p.add_argument("--no-verify-images", action="store_true", help="skip opening every image up front")
    p.add_argument(
        "--stop-after-epoch",
        type=int,
        metavar="N",
        help="stop (resumably) after epoch N, e.g. to fit a job time limit",
    )
    p.add_argument(
        "--eval-every", type=int, default=1, metavar="N", help="validate every N epochs (and the last)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_train_flags(p)
    p.set_defaults(handler=cmd_classify_train)

    p = actions.add_parser(
        "eval",
        parents=[common, progress],
        help="top-1/top-5/loss/images-per-s and a confusion matrix",
        description="Evaluate a checkpoint on DIR/val (default: the embedded digits' val split). "
        "Official ImageNet checkpoints use the paper's eval transform; metaformer checkpoints the one they "
        "were trained with.",
    )
    p.add_argument("--checkpoint", metavar="PATH", help="weights file (metaformer, official or timm)")
    p.add_argument("--model", help="model name (needed for official/timm checkpoints and --pretrained)")
    p.add_argument(
        "--pretrained", action="store_true", help="evaluate the released ImageNet weights of --model"
    )
    p.add_argument("--data", metavar="DIR", help="folder with val/<class>/* images")
    p.add_argument("--batch-size", type=int, default=128, metavar="N")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="data-loading processes")
    p.add_argument("--img-size", type=int, metavar="PX", help="override the eval input size")
    p.add_argument("--crop-pct", type=float, metavar="F", help="override the eval centre-crop fraction")
    p.add_argument("--amp", default="off", choices=("off", "auto", "bf16", "fp16"), help="autocast dtype")
    _add_channels_last_flag(p)
    p.add_argument(
        "--confusion", metavar="PNG", help="confusion-matrix image (default: next to the checkpoint)"
    )
    p.add_argument("--limit", type=int, metavar="N", help="evaluate a seeded random subset of N images")
    _add_backend_flag(p)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=cmd_classify_eval)

    p = actions.add_parser("predict", parents=[common], help="class names and probabilities for images")
    p.add_argument("inputs", metavar="IMAGE|DIR", help="an image file or a folder (searched recursively)")
    p.add_argument("--checkpoint", metavar="PATH", help="weights file (metaformer, official or timm)")
    p.add_argument("--model", help="model name (needed for official/timm checkpoints and --pretrained)")
    p.add_argument("--pretrained", action="store_true", help="use the released ImageNet weights of --model")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes to list per image (5)")
    p.add_argument("--cam", metavar="OUT.png", help="write a Grad-CAM heat map of the top class (one image)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    _add_backend_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_classify_predict)


# --------------------------------------------------------------------------- detect / segment
def _model_kwargs_json(text: str | None) -> dict[str, Any]:
    """--model-kwargs: a JSON object of backbone overrides."""
    from metaformer.errors import ConfigError

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--model-kwargs is not valid JSON ({err}); e.g. '{{\"depths\": [1, 1, 1, 1]}}'"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError("--model-kwargs must be a JSON object, e.g. '{\"depths\": [1, 1, 1, 1]}'")
    return value


def _tuple(value: Sequence[Any] | None) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


def _progress_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: only when stderr is a terminal)",
    )
    parent.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    return parent


def _run_parent(kind: str) -> argparse.ArgumentParser:
    """Flags every dense training command shares (run folder, backbone, loop options)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default="poolformer_s12", help="backbone name (`metaformer models` lists them)")
    p.add_argument("--recipe", choices=("paper", "shapes"), help="preset (paper with --data, else shapes)")
    p.add_argument("--output", metavar="DIR", help=f"run folder (default runs/{kind}/MODEL-TIMESTAMP)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run files in --output")
    p.add_argument(
        "--backbone-checkpoint",
        metavar="PATH",
        help="initialise the backbone from classification weights (official, timm or metaformer)",
    )
    p.add_argument(
        "--frozen-stages",
        type=int,
        default=-1,
        metavar="N",
        help="freeze the stem (0) and stages 1..N (-1: none)",
    )
    p.add_argument(
        "--model-kwargs", metavar="JSON", help="backbone overrides, e.g. '{\"depths\": [1,1,1,1]}'"
    )
    p.add_argument("--epochs", type=int, metavar="N", help="epochs")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per process per step")
    p.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate (used as given)")
    p.add_argument("--weight-decay", type=float, metavar="WD", help="AdamW weight decay (paper 1e-4)")
    p.add_argument("--warmup-iters", type=int, metavar="N", help="linear warmup steps")
    p.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm (paper: off)")
    p.add_argument("--accum-steps", type=int, default=1, metavar="N", help="gradient accumulation steps")
    p.add_argument(
        "--amp",
        choices=("off", "auto", "bf16", "fp16"),
        help="autocast dtype (default: the recipe's); auto: bf16 where native (CUDA, AVX512-BF16, AMX)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.add_argument("--workers", type=int, metavar="N", help="data-loading processes (shapes 0, folders 4)")
    p.add_argument("--limit-train", type=int, metavar="N", help="train on a seeded random subset of N images")
    p.add_argument(
        "--limit-val", type=int, metavar="N", help="validate on a seeded random subset of N images"
    )
    p.add_argument("--stop-after-epoch", type=int, metavar="N", help="stop (resumably) after epoch N")
    _add_channels_last_flag(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def _dense_run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The backbone and run flags that detect train and segment train share, as config fields."""
    return {
        "frozen_stages": args.frozen_stages,
        "backbone_checkpoint": args.backbone_checkpoint,
        "model_kwargs": _model_kwargs_json(args.model_kwargs),
        "accum_steps": args.accum_steps,
        "amp": args.amp,
        "seed": args.seed,
        "num_workers": args.workers,
        "limit_train": args.limit_train,
        "limit_val": args.limit_val,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "stop_after_epoch": args.stop_after_epoch,
        "channels_last": args.channels_last,
        "eval_every": args.eval_every,
        "device": args.device,
        "progress": args.progress,
    }


def cmd_detect_train(args: argparse.Namespace) -> int:
    from metaformer.tasks.detect import DetectTrainConfig, train_detector

    summary = train_detector(
        DetectTrainConfig(
            model=args.model,
            data=args.data,
            recipe=args.recipe,
            output=args.output,
            arch=args.arch,
            train_split=args.train_split,
            val_split=args.val_split,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            sched=args.sched,
            lr_steps=_tuple(args.lr_steps),
            warmup_iters=args.warmup_iters,
            warmup_ratio=args.warmup_ratio,
            min_size=args.min_size,
            max_size=args.max_size,
            fpn_channels=args.fpn_channels,
            head_norm=args.head_norm,
            anchor_sizes=_tuple(args.anchor_sizes),
            clip_grad=args.clip_grad,
            **_dense_run_kwargs(args),
        )
    )
    if _rank() == 0:
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            last = summary.get("last") or {}
            ap = ", ".join(f"{k} {last[k]:.3f}" for k in ("bbox_AP", "bbox_AP50", "segm_AP") if k in last)
            print(f"{ap} after {summary['epochs']} epochs; run folder {summary['output']}")
    return 0


def cmd_detect_eval(args: argparse.Namespace) -> int:
    from metaformer.tasks.detect import DetectEvalConfig, evaluate_detector

    result = evaluate_detector(
        DetectEvalConfig(
            checkpoint=args.checkpoint,
            data=args.data,
            split=args.split,
            batch_size=args.batch_size,
            num_workers=args.workers,
            limit=args.limit,
            results=args.results,
            device=args.device,
            progress=args.progress,
        )
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']} on {result['data']} ({result['split']}): {result['images']} images")
    for kind in ("bbox", "segm"):
        if f"{kind}_AP" in result:
            print(f"  {kind}: " + "  ".join(f"{m} {100 * result[f'{kind}_{m}']:.1f}" for m in _COCO_NAMES))
    if result["results"]:
        print(f"  COCO results: {result['results']}")
    return 0


def cmd_detect_predict(args: argparse.Namespace) -> int:
    from metaformer.tasks.detect import DetectPredictConfig, predict_detections

    result = predict_detections(
        DetectPredictConfig(
            inputs=args.inputs,
            checkpoint=args.checkpoint,
            output=args.output,
            score_thresh=args.score_thresh,
            device=args.device,
        )
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for item in result["images"]:
        print(f"{item['path']}: {item['detections']} detection(s) -> {item['drawn']}")
    print(f"COCO results ({result['detections']} detections): {result['results']}")
    return 0


_COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def add_detect_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser(
        "detect",
        parents=[common],
        help="train, evaluate and run RetinaNet / Mask R-CNN detectors",
        description="Object detection with a MetaFormer backbone. `metaformer detect train` with no options "
        "trains a poolformer_s12 RetinaNet on the generated shapes data set.",
    )
    actions = group.add_subparsers(dest="detect_command", metavar="ACTION")
    actions.required = True
    progress = _progress_parent()

    p = actions.add_parser(
        "train",
        parents=[common, progress, _run_parent("detect")],
        help="train a detector",
        description="Train RetinaNet or Mask R-CNN. Flags left out come from --recipe (paper: the PoolFormer "
        "COCO 1x settings, default with --data; shapes: the CPU demo on the generated shapes). Under "
        "`torchrun --nproc_per_node=N -m metaformer detect train` it trains data-parallel.",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="COCO layout: DIR/annotations/instances_SPLIT.json and images in DIR/SPLIT or DIR/images/SPLIT "
        "(default: the generated shapes set)",
    )
    p.add_argument("--arch", choices=("retinanet", "maskrcnn"), help="detector (default retinanet)")
    p.add_argument("--train-split", metavar="NAME", help="train split (train2017 with --data)")
    p.add_argument("--val-split", metavar="NAME", help="validation split (val2017 with --data)")
    p.add_argument("--sched", choices=("step", "cosine"), help="lr schedule (paper: step)")
    p.add_argument("--lr-steps", type=int, nargs="+", metavar="EPOCH", help="step decay epochs (paper 8 11)")
    p.add_argument("--warmup-ratio", type=float, metavar="F", help="warmup starts at lr x F (paper 0.001)")
    p.add_argument("--min-size", type=int, metavar="PX", help="shorter side after resizing (paper 800)")
    p.add_argument("--max-size", type=int, metavar="PX", help="longer side limit (paper 1333)")
    p.add_argument("--fpn-channels", type=int, metavar="C", help="FPN width (paper 256)")
    p.add_argument(
        "--head-norm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GroupNorm in the RetinaNet head convs (paper: off)",
    )
    p.add_argument("--anchor-sizes", type=int, nargs=5, metavar="PX", help="base anchor per level (32..512)")
    p.add_argument(
        "--eval-every", type=int, metavar="N", help="validate every N epochs and the last (paper 1, shapes 6)"
    )
    p.set_defaults(handler=cmd_detect_train)

    p = actions.add_parser(
        "eval",
        parents=[common, progress],
        help="COCO bbox/segm AP of a checkpoint",
        description="COCO AP, AP50, AP75, APs, APm, APl (pycocotools) of a detect checkpoint.",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="best/last.safetensors of a detect run"
    )
    p.add_argument("--data", metavar="DIR", help="COCO-layout folder (default: the generated shapes set)")
    p.add_argument("--split", metavar="NAME", help="split to evaluate (val2017 with --data, else val)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="data-loading processes")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate a seeded random subset of N images")
    p.add_argument("--results", metavar="JSON", help="also write the detections as COCO results JSON")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=cmd_detect_eval)

    p = actions.add_parser(
        "predict", parents=[common], help="draw detections on images and write COCO results JSON"
    )
    p.add_argument("inputs", metavar="IMAGE|DIR", help="an image file or a folder (searched recursively)")
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="best/last.safetensors of a detect run"
    )
    p.add_argument("--output", default="predictions", metavar="DIR", help="where drawings and JSON go")
    p.add_argument(
        "--score-thresh", type=float, default=0.5, metavar="S", help="keep detections scoring >= S"
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_detect_predict)


def cmd_segment_train(args: argparse.Namespace) -> int:
    from metaformer.tasks.segment import SegmentTrainConfig, train_segmenter

    summary = train_segmenter(
        SegmentTrainConfig(
            model=args.model,
            data=args.data,
            layout=args.layout,
            classes=args.classes,
            train_split=args.train_split,
            val_split=args.val_split,
            recipe=args.recipe,
            output=args.output,
            iters=args.iters,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_iters=args.warmup_iters,
            power=args.power,
            scale=_tuple(args.scale),
            ratio_range=_tuple(args.ratio_range),
            crop_size=args.crop_size,
            cat_max_ratio=args.cat_max_ratio,
            photometric=args.photometric,
            eval_iters=args.eval_iters,
            clip_grad=args.clip_grad,
            fpn_channels=args.fpn_channels,
            head_channels=args.head_channels,
            dropout=args.dropout,
            class_weight=_tuple(args.class_weight),
            **_dense_run_kwargs(args),
        )
    )
    if _rank() == 0:
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            last = summary.get("last") or {}
            miou, acc = last.get("mIoU", float("nan")), last.get("pixel_acc", float("nan"))
            print(
                f"mIoU {miou:.3f}, pixel accuracy {acc:.3f} after {summary['epochs']} epochs; "
                f"run folder {summary['output']}"
            )
    return 0


def cmd_segment_eval(args: argparse.Namespace) -> int:
    from metaformer.tasks.segment import SegmentEvalConfig, evaluate_segmenter

    result = evaluate_segmenter(
        SegmentEvalConfig(
            checkpoint=args.checkpoint,
            data=args.data,
            layout=args.layout,
            classes=args.classes,
            split=args.split,
            num_workers=args.workers,
            limit=args.limit,
            device=args.device,
            progress=args.progress,
        )
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']} on {result['data']}: {result['images']} images")
    print(
        f"  mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  "
        f"pixel accuracy {100 * result['pixel_acc']:.2f}"
    )
    for name, iou in result["per_class_IoU"].items():
        print(f"  {name:<24}{'n/a' if iou is None else f'{100 * iou:.2f}':>8}")
    return 0


def cmd_segment_predict(args: argparse.Namespace) -> int:
    from metaformer.tasks.segment import SegmentPredictConfig, predict_segmentation

    result = predict_segmentation(
        SegmentPredictConfig(
            inputs=args.inputs,
            checkpoint=args.checkpoint,
            output=args.output,
            alpha=args.alpha,
            device=args.device,
        )
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for item in result["images"]:
        print(f"{item['path']}: overlay {item['overlay']}, labels {item['labels']}")
    return 0


def add_segment_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser(
        "segment",
        parents=[common],
        help="train, evaluate and run Semantic FPN segmenters",
        description="Semantic segmentation with a MetaFormer backbone and Semantic FPN. `metaformer segment "
        "train` with no options trains poolformer_s12 on the generated shapes data set.",
    )
    actions = group.add_subparsers(dest="segment_command", metavar="ACTION")
    actions.required = True
    progress = _progress_parent()
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data",
        metavar="DIR",
        help="ADE20K layout (DIR/images/SPLIT, DIR/annotations/SPLIT) or images/ + masks/ + classes.txt "
        "(default: the generated shapes set)",
    )
    data.add_argument("--layout", default="auto", choices=("auto", "ade20k", "folder"), help="data layout")
    data.add_argument("--classes", metavar="FILE", help="class names, one a line (default: the layout's)")

    p = actions.add_parser(
        "train",
        parents=[common, progress, data, _run_parent("segment")],
        help="train a Semantic FPN",
        description="Train Semantic FPN. Flags left out come from --recipe (paper: the PoolFormer ADE20K "
        "settings, default with --data; shapes: the CPU demo on the generated shapes). Under "
        "`torchrun --nproc_per_node=N -m metaformer segment train` it trains data-parallel.",
    )
    p.add_argument("--train-split", metavar="NAME", help="train split (training for ADE20K, else train)")
    p.add_argument("--val-split", metavar="NAME", help="validation split (validation for ADE20K, else val)")
    p.add_argument(
        "--iters", type=int, metavar="N", help="optimizer steps, rounded up to epochs (paper 40000)"
    )
    p.add_argument("--power", type=float, default=0.9, metavar="P", help="poly schedule power (0.9)")
    p.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help="resize scale (2048 512)")
    p.add_argument(
        "--ratio-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="rescale ratios (0.5 2)"
    )
    p.add_argument("--crop-size", type=int, metavar="PX", help="training crop (paper 512)")
    p.add_argument("--cat-max-ratio", type=float, metavar="F", help="max share of one class in a crop (0.75)")
    p.add_argument(
        "--photometric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="photometric distortion (on)",
    )
    p.add_argument("--eval-iters", type=int, metavar="N", help="validate every N steps (paper 4000)")
    p.add_argument(
        "--eval-every", type=int, metavar="N", help="validate every N epochs (overrides --eval-iters)"
    )
    p.add_argument("--fpn-channels", type=int, metavar="C", help="FPN width (paper 256, shapes 64)")
    p.add_argument("--head-channels", type=int, metavar="C", help="head width (paper and shapes 128)")
    p.add_argument(
        "--dropout", type=float, metavar="P", help="dropout before the classifier (paper 0.1, shapes 0)"
    )
    p.add_argument(
        "--class-weight",
        type=float,
        nargs="+",
        metavar="W",
        help="cross-entropy weight per class, in class order (default: none, as the paper)",
    )
    p.set_defaults(handler=cmd_segment_train)

    p = actions.add_parser(
        "eval",
        parents=[common, progress, data],
        help="mIoU, per-class IoU and pixel accuracy of a checkpoint",
        description="mIoU, mAcc, pixel accuracy and per-class IoU from one confusion matrix over the split.",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="best/last.safetensors of a segment run"
    )
    p.add_argument("--split", metavar="NAME", help="split to evaluate (validation for ADE20K, else val)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="data-loading processes")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate a seeded random subset of N images")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(handler=cmd_segment_eval)

    p = actions.add_parser("predict", parents=[common], help="colour overlay and label PNGs for images")
    p.add_argument("inputs", metavar="IMAGE|DIR", help="an image file or a folder (searched recursively)")
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH", help="best/last.safetensors of a segment run"
    )
    p.add_argument("--output", default="predictions", metavar="DIR", help="where the PNGs go")
    p.add_argument("--alpha", type=float, default=0.5, metavar="A", help="overlay opacity (0.5)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_segment_predict)


# --------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from metaformer.errors import ConfigError
    from metaformer.export import ExportConfig, run_export

    if args.img_size and len(args.img_size) > 2:
        raise ConfigError(f"--img-size takes H or H W, got {len(args.img_size)} values")
    report = run_export(
        ExportConfig(
            model=args.name,
            output=Path(args.output),
            checkpoint=Path(args.checkpoint) if args.checkpoint else None,
            random_init=args.random_init,
            format=args.format,
            img_size=_img_size(args.img_size),
            dynamic_batch=args.dynamic_batch,
            fold=not args.no_fold,
        )
    )
    h, w = report.img_size
    check = "onnxruntime" if report.format == "onnx" else "reloaded TorchScript"
    print(
        f"wrote {report.path} ({report.format}, {h}x{w}, "
        f"{'dynamic' if report.dynamic_batch else 'fixed'} batch); {check} matches PyTorch to "
        f"{report.max_abs_diff:.1e} (max abs diff) on batches {', '.join(map(str, report.checked_batches))}"
    )
    return 0


def add_export_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export", parents=[common], help="write a model as ONNX or TorchScript, checked against PyTorch"
    )
    p.add_argument("name", help="model name, e.g. poolformer_s12")
    p.add_argument("--checkpoint", help="weights file (metaformer safetensors, timm or official checkpoint)")
    p.add_argument(
        "--random-init", action="store_true", help="export random weights instead (to try export out)"
    )
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default onnx")
    p.add_argument("--img-size", type=int, nargs="+", metavar=("H", "W"), help="input size (default 224 224)")
    p.add_argument("--dynamic-batch", action="store_true", help="let the batch size vary at run time")
    p.add_argument(
        "--no-fold", action="store_true", help="export the plain graph instead of the folded inference graph"
    )
    p.add_argument("--output", "-o", required=True, help="output file (written atomically)")
    p.set_defaults(handler=cmd_export)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

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

from metaformer.errors import MetaformerError

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


def cmd_info(args: argparse.Namespace) -> int:
    from metaformer.report import model_info

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

    p = sub.add_parser("info", parents=[common], help="per-stage output shapes, params and MACs of one model")
    p.add_argument("name")
    p.add_argument("--img-size", type=int, nargs="+", metavar=("H", "W"), help="input size (default 224 224)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="metaformer",
        description="MetaFormer vision backbones: models, weights, training, detection, segmentation.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_model_parsers(sub, common)
    add_weights_parsers(sub, common)
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
    except (MetaformerError, OSError) as err:
        if args.debug:
            raise
        print(f"metaformer: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - the one catch-all, at the boundary
        if args.debug:
            raise
        print(
            f"metaformer: error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


# --------------------------------------------------------------------------- weights (convert / download)
def cmd_convert(args: argparse.Namespace) -> int:
    from metaformer.weights import convert_checkpoint

    name = convert_checkpoint(args.src, args.dst, model_name=args.model)
    print(f"wrote {args.dst} ({name}, safetensors)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from metaformer.weights import download_weights

    path = download_weights(args.name, cache_dir=args.cache_dir, progress=sys.stderr.isatty())
    print(path)
    return 0


def add_weights_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "convert", parents=[common], help="turn an official or timm checkpoint into metaformer safetensors"
    )
    p.add_argument("src", help="checkpoint file (.pth, .pth.tar, .bin or .safetensors)")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", help="model name (detected from the tensor shapes when omitted)")
    p.set_defaults(handler=cmd_convert)

    p = sub.add_parser("download", parents=[common], help="download released weights into the cache")
    p.add_argument("name", help="model name or weights tag, e.g. poolformer_s12 or poolformer_s12.sail_in1k")
    p.add_argument("--cache-dir", help="cache folder (default $METAFORMER_HOME or ~/.cache/metaformer)")
    p.set_defaults(handler=cmd_download)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""The command line: parse flags, call one library function, map exceptions to exit codes.

The only module that prints errors or picks exit codes. Every command group adds its parser in an
``add_<group>_parser`` function, so tests can build arguments without a shell.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Collection, Sequence
from functools import partial
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


class _HeightWidth(argparse._StoreAction):
    """``--img-size H [W]``: argparse's nargs cannot say "one or two", so the count is checked here, as a
    usage error (exit 2) like any other value count argparse refuses."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        if len(values) > 2:
            parser.error(f"argument {option_string}: takes H or H W, got {len(values)} values")
        setattr(namespace, self.dest, values)


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
    cache = report["compile_cache"]
    print(f"compile      cache {cache['path']}: {cache['files']} files, {cache['bytes'] / 1e6:.1f} MB")
    print(f"  {'route':<16}{'shape class':<52}{'choice':<18}measured (ms)")
    for decision in report["routes"]:
        times = ", ".join(
            f"{k} {v:.3g}" for k, v in sorted(decision["times_ms"].items(), key=lambda kv: kv[1])
        )
        source = "" if decision["source"] == "probe" else f" [{decision['source']}]"
        if decision.get("probes", 1) > 1:
            times += f" (fastest over {decision['probes']} probes)"
        print(
            f"  {decision['route']:<16}{decision['shape_class']:<52}{decision['choice'] + source:<18}{times}"
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
    size = f"{info['img_size'][0]}x{info['img_size'][1]}"
    if info["paper_top1"] is not None:
        print(f"  paper ImageNet-1K top-1: {info['paper_top1']}")
    elif info["weights_top1"]:  # another size: the released weights evaluated at it, if any
        for tag, top1 in info["weights_top1"].items():
            print(f"  ImageNet-1K top-1 at {size}: {top1} ({tag})")
    else:
        print(f"  ImageNet-1K top-1 at {size}: none reported (no released weights at this size)")
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
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (faster)")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser(
        "info",
        parents=[common],
        help="per-stage output shapes, params and MACs of one model; --system: this machine and its routes",
    )
    p.add_argument("name", nargs="?", help="model name, e.g. poolformer_s12 (see `metaformer models`)")
    p.add_argument(
        "--system",
        action="store_true",
        help="print the CPU, its ISA, native bf16, the calibrate factor and every route chosen here",
    )
    p.add_argument(
        "--probe", action="store_true", help="with --system: measure the routes on PoolFormer-S12 now"
    )
    p.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        action=_HeightWidth,
        metavar=("H", "W"),
        help="input size (default 224 224)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)


# --------------------------------------------------------------------------- entry point
class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming it and the help to read, not the whole usage block
    (the train commands' usage runs to dozens of lines and buries the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# the commands this module defines itself: running one imports no task module
BUILTIN_COMMANDS = ("models", "info", "convert", "download")


def command_word(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs (``classify`` in ``--debug classify predict x.png``), or None when
    anything else comes first (``--help``): then the parser is built whole, to list every command."""
    for arg in argv:
        if arg != "--debug":
            return None if arg.startswith("-") else arg
    return None


def build_parser(command: str | None = None, *, summary: bool = False) -> argparse.ArgumentParser:
    """The whole CLI, or (``command``, the first command word) just what parsing that command needs:
    its own flags are the same, and only its task module is imported. ``summary``: the task commands
    are listed by name and help line only (``metaformer --help``), importing no task module."""
    from metaformer import __version__

    common = _common()
    parser = _Parser(
        prog="metaformer",
        description="MetaFormer vision backbones: models, weights, training, detection, segmentation.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"metaformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_model_parsers(sub, common)
    add_weights_parsers(sub, common)
    if summary:
        from metaformer.tasks import COMMAND_HELP, COMMAND_MODULES

        for word, help_line in COMMAND_HELP.items():
            sub.add_parser(word, help=help_line, add_help=False)
        listed = {COMMAND_MODULES.get(word) for word in COMMAND_HELP}
        add_task_parsers(sub, common, skip=listed)  # tasks registered at run time list their own
    elif command not in BUILTIN_COMMANDS:
        add_task_parsers(sub, common, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    word = command_word(argv)
    parser = build_parser(word) if word is not None else build_parser(summary=True)
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


# --------------------------------------------------------------------------- task commands
def add_task_parsers(
    sub: argparse._SubParsersAction,
    common: argparse.ArgumentParser,
    command: str | None = None,
    skip: Collection[str | None] = (),
) -> None:
    """``metaformer <task> <action>`` for every registered task, flags generated from its configs; with
    ``command`` (a command word) only for the module that declares it, if one does; never for the
    modules in ``skip``."""
    import importlib

    from metaformer.tasks import command_modules

    modules = [name for name in command_modules(command) if name not in skip]
    if modules:
        from metaformer.options import add_config_flags, add_flags
    for module_name in modules:
        commands = importlib.import_module(module_name).COMMANDS
        actions = sub
        if commands.name is not None:
            group = sub.add_parser(
                commands.name, parents=[common], help=commands.help, description=commands.description
            )
            actions = group.add_subparsers(dest=f"{commands.name}_command", metavar="ACTION")
            actions.required = True
        for action in commands.actions:
            p = actions.add_parser(
                action.name, parents=[common], help=action.help, description=action.description
            )
            add_flags(p, action.config)
            add_config_flags(p)
            p.add_argument("--json", action="store_true", help=action.json_help)
            name = action.name if commands.name is None else f"{commands.name} {action.name}"
            p.set_defaults(handler=partial(cmd_task, module_name, name, action, p))


def cmd_task(
    module_name: str, command: str, action: Any, parser: argparse.ArgumentParser, args: argparse.Namespace
) -> int:
    import dataclasses
    import importlib

    from metaformer.options import config_from_args, jsonable

    config = config_from_args(action.config, args, command, parser)
    if args.print_config:
        resolve = getattr(config, "resolve", None)
        resolved = dataclasses.asdict(resolve() if resolve else config)
        print(json.dumps(jsonable(resolved), indent=2, default=str))  # default: paths
        return 0
    module = importlib.import_module(module_name)
    result = getattr(module, action.run)(config)
    if action.rank0_only and _rank() != 0:
        return 0
    if args.json and dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    print(
        json.dumps(result, indent=2, default=str)
        if args.json
        else getattr(module, action.report_function)(result)
    )
    failed = result.get("failed") if isinstance(result, dict) else None
    if failed:  # the command ran and reported, but its result misses a bar the user set (--max-drop)
        print(f"metaformer: error: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

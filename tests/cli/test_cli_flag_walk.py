"""Every CLI command's every numeric flag, read from the parser itself, fed 0, -1, NaN, inf, a huge number
and a word: each is either refused in one sentence naming the flag, no traceback, or gets past validation
to the library entry point, with the value kept as given (no ``value or default``). The exit code says
which kind of refusal it was: 2 for a value the flag's type cannot read (a usage error, argparse's), 1 for
a value that reads but is out of range (the config's check).

The library's train / eval / predict entry points are replaced by stubs that run the config's own
validation (``resolve()`` for training configs) and stop, so no data is read and no step is trained.
"""

from __future__ import annotations

import argparse
import math

import pytest

from metaformer import cli

VALUES = ("0", "-1", "nan", "inf", "1000000000000", "word")

# One valid command line per leaf command (required arguments only). A new command must be added here:
# test_every_command_is_walked fails until it is.
BASE: dict[tuple[str, ...], list[str]] = {
    ("models",): [],
    ("info",): ["poolformer_s12"],
    ("convert",): ["src.pth", "dst.safetensors"],
    ("download",): ["poolformer_s12"],
    ("classify", "train"): [],
    ("classify", "eval"): ["--checkpoint", "w.safetensors"],
    ("classify", "predict"): ["img.png", "--checkpoint", "w.safetensors"],
    ("ablate",): [],
    ("detect", "train"): [],
    ("detect", "eval"): ["--checkpoint", "w.safetensors"],
    ("detect", "predict"): ["img.png", "--checkpoint", "w.safetensors"],
    ("segment", "train"): [],
    ("segment", "eval"): ["--checkpoint", "w.safetensors"],
    ("segment", "predict"): ["img.png", "--checkpoint", "w.safetensors"],
    ("export",): ["poolformer_s12", "--output", "m.onnx", "--random-init"],
}
# (module, function) the CLI calls per command; the stub validates, records the config and stops.
ENTRY = {
    ("info",): ("metaformer.report", "create_model"),  # model_info checks its size first
    ("convert",): ("metaformer.weights", "convert_checkpoint"),
    ("download",): ("metaformer.weights", "download_weights"),
    ("classify", "train"): ("metaformer.tasks.classify", "train_classifier"),
    ("classify", "eval"): ("metaformer.tasks.classify", "evaluate_classifier"),
    ("classify", "predict"): ("metaformer.tasks.classify", "predict"),
    ("ablate",): ("metaformer.ablate", "run_ablation"),
    ("detect", "train"): ("metaformer.tasks.detect", "train_detector"),
    ("detect", "eval"): ("metaformer.tasks.detect", "evaluate_detector"),
    ("detect", "predict"): ("metaformer.tasks.detect", "predict_detections"),
    ("segment", "train"): ("metaformer.tasks.segment", "train_segmenter"),
    ("segment", "eval"): ("metaformer.tasks.segment", "evaluate_segmenter"),
    ("segment", "predict"): ("metaformer.tasks.segment", "predict_segmentation"),
    ("export",): ("metaformer.export", "run_export"),
}
# CLI dest -> config field where the names differ.
FIELD = {"workers": "num_workers", "confusion": "confusion_png"}


class Reached(BaseException):
    """Raised by the stubs: validation passed and the library entry point was called (not an Exception,
    so the CLI's catch-all does not swallow it)."""

    def __init__(self, args: tuple) -> None:
        super().__init__()
        self.call_args = args


def _stub(*args, **kwargs):
    for arg in args:
        resolve = getattr(arg, "resolve", None)
        if callable(resolve):
            args = (resolve(), *args[1:])
    raise Reached(args)


def _leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaves(child, (*path, name))


def _numeric_flags():
    for path, parser in _leaves(cli.build_parser()):
        for action in parser._actions:
            if action.type in (int, float) and action.option_strings:
                yield pytest.param(path, action, id=f"{' '.join(path)} {action.option_strings[-1]}")


def test_every_command_is_walked():
    leaves = {path for path, _ in _leaves(cli.build_parser())}
    assert leaves == set(BASE), "add the new command's required arguments to BASE (and ENTRY)"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    import importlib

    parser = cli.build_parser()  # built once: parse_args keeps no state between calls
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("walk"))
        patch.setattr(cli, "build_parser", lambda command=None: parser)
        for module, name in ENTRY.values():
            patch.setattr(importlib.import_module(module), name, _stub)
        yield


def _one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("path,action", list(_numeric_flags()))
def test_numeric_flag(stubs, capsys, path, action):
    for value in VALUES:
        _check_value(capsys, path, action, value)


def _check_value(capsys, path, action, value):
    capsys.readouterr()
    flag = action.option_strings[-1]
    nargs = action.nargs if isinstance(action.nargs, int) else 1
    argv = [*path, *BASE[path], flag, *([value] * nargs)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            code = cli.main(argv)
            raise SystemExit(code)
    except Reached as reached:
        # valid: it got past validation, and the value reached the config as given
        number = action.type(value)
        assert math.isfinite(number), f"{flag} {value} was accepted"
        for config in reached.call_args:
            field = FIELD.get(action.dest, action.dest)
            if hasattr(config, field):
                got = getattr(config, field)
                kept = got if isinstance(got, (tuple, list)) else (got,)
                assert all(v == number for v in kept), f"{flag} {value} became {field}={got!r}"
        return
    code = exit_info.value.code
    try:
        action.type(value)
        expected = 1  # it reads as a number: the config refused it
    except ValueError:
        expected = 2  # the flag's type cannot read it: a usage error
    assert code == expected, f"{' '.join(argv)} exited {code}, not {expected}"
    line = _one_sentence(capsys.readouterr().err)
    names = (flag, action.dest, action.dest.replace("_", " "), FIELD.get(action.dest, action.dest))
    assert any(name in line for name in names), f"{' '.join(argv)}: '{line}' does not name {flag}"


@pytest.mark.parametrize(
    "argv,name",
    [
        (["segment", "train", "--fpn-channels", "0"], "fpn_channels"),
        (["segment", "train", "--head-channels", "0"], "head_channels"),
        (["detect", "train", "--min-size", "2000"], "min_size"),
        (["segment", "train", "--stop-after-epoch", "99"], "stop_after_epoch"),
        (["classify", "train", "--lr", "nan"], "lr"),
        (["ablate", "--lr", "inf"], "lr"),
        (["classify", "eval", "--checkpoint", "w.safetensors", "--threads", "0"], "threads"),
        (["classify", "predict", "img.png", "--checkpoint", "w.safetensors", "--threads", "-1"], "threads"),
        (["classify", "eval", "--checkpoint", "w.safetensors", "--max-drop", "-1"], "max_drop"),
        (["classify", "eval", "--checkpoint", "w.safetensors", "--max-drop", "nan"], "max_drop"),
    ],
)
def test_named_cases_are_refused(stubs, capsys, argv, name):
    """The issue's cases: 0 channels used to become the recipe's width; the others passed validation."""
    assert cli.main(argv) == 1
    assert name in _one_sentence(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "poolformer_s12", "--img-size", "64", "64", "64"],  # H or H W: three is a usage error
        ["ablate", "--depths", "1", "1", "1"],  # exactly four
        ["classify", "train", "--epochs", "2.5"],  # an int flag
        ["classify", "train", "--no-such-flag"],
        ["classify", "train", "--compile", "bogus"],
        ["detect", "train", "--compile", "sometimes"],
        ["ablate", "--compile", "yes"],
        ["classify", "eval", "--checkpoint", "w.safetensors", "--precision", "fp8"],
        ["classify", "predict", "img.png", "--checkpoint", "w.safetensors", "--backend", "tensorrt"],
        ["export", "poolformer_s12", "--output", "m.onnx", "--random-init", "--format", "tflite"],
        ["export", "poolformer_s12", "--output", "m.onnx", "--random-init", "--precision", "int4"],
    ],
)
def test_command_lines_argparse_cannot_read_exit_2(stubs, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error:" in _one_sentence(capsys.readouterr().err)


def test_explicit_zero_is_used(stubs):
    """A valid 0 reaches the config as 0 (``value or default`` turned it into the default)."""
    with pytest.raises(Reached) as reached:
        cli.main(["detect", "train", "--warmup-ratio", "0", "--weight-decay", "0", "--warmup-iters", "0"])
    (config,) = reached.value.call_args
    assert (config.warmup_ratio, config.weight_decay, config.warmup_iters) == (0, 0, 0)

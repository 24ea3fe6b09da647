"""cli.main's exit codes: 0 done, 1 a refused input or a failure (one sentence, no traceback), 2 a command
line argparse cannot read, 130 interrupted; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import pytest

from metaformer import cli
from metaformer.errors import ConfigError


def _fail_with(monkeypatch, error: BaseException) -> None:
    """`metaformer models` raises ``error`` from inside the library call."""
    import metaformer.report

    def raise_it(*args, **kwargs):
        raise error

    monkeypatch.setattr(metaformer.report, "model_table", raise_it)


def test_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "metaformer: interrupted\n"


def test_sigint_to_a_running_command_exits_130_without_a_traceback(tmp_path):
    """A real Ctrl-C (SIGINT) while `classify train` runs, not a simulated one."""
    args = [sys.executable, "-m", "metaformer", "classify", "train", "--output", str(tmp_path / "run"),
            "--model-kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 8, 8, 8]}', "--epochs", "50"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    try:
        started = time.monotonic()
        line = ""
        while "process(es)" not in line and time.monotonic() - started < 120:  # training has begun
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the run ended before training"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "metaformer: interrupted"


@pytest.mark.parametrize(
    "error, line",
    [
        (ConfigError("lr must be positive, got 0"), "metaformer: error: lr must be positive, got 0"),
        (
            RuntimeError("boom\nmore"),
            "metaformer: error: RuntimeError: boom (rerun with --debug for the traceback)",
        ),
    ],
)
def test_errors_are_one_line_and_debug_reraises_them(monkeypatch, capsys, error, line):
    _fail_with(monkeypatch, error)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == line and "Traceback" not in err
    with pytest.raises(type(error)) as raised:
        cli.main(["models", "--debug"])
    assert raised.value is error  # the original exception, traceback and all


def test_a_command_line_argparse_cannot_read_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["models", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def _declared_words() -> dict[str, str]:
    import importlib

    from metaformer import tasks

    declared = {}
    for module in (*tasks.TASK_MODULES, *tasks.TOOL_MODULES):
        commands = importlib.import_module(module).COMMANDS
        words = [commands.name] if commands.name else [action.name for action in commands.actions]
        declared.update(dict.fromkeys(words, module))
    return declared


def test_the_command_index_names_the_module_declaring_each_word():
    from metaformer import tasks

    assert _declared_words() == tasks.COMMAND_MODULES
    whole = cli.build_parser()
    choices = next(a for a in whole._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(choices) == set(tasks.COMMAND_MODULES) | set(cli.BUILTIN_COMMANDS)


@pytest.mark.parametrize("word", ["classify", "detect", "segment", "ablate", "export", "models", "convert"])
def test_a_command_built_alone_is_the_same_as_in_the_whole_parser(word):
    def subtree(parser, path=()):
        yield " ".join(path), parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    if not path and name != word:
                        continue
                    yield from subtree(child, (*path, name))

    whole = dict(subtree(cli.build_parser()))
    alone = dict(subtree(cli.build_parser(word)))
    del whole[""], alone[""]  # the top level: the whole parser lists every command
    assert alone == whole and len(alone) >= 1


def test_the_command_word_skips_debug_and_stops_at_other_flags():
    assert cli.command_word(["--debug", "classify", "predict", "x.png"]) == "classify"
    assert cli.command_word(["--help", "classify"]) is None
    assert cli.command_word([]) is None


def test_predict_imports_no_training_or_other_runtime_library(tmp_path):
    """A one-image `classify predict` loads torch and our code, not the seconds of torchvision (and torch's
    compiler stack under it), timm, the other tasks, plotting or the other runtimes."""
    from PIL import Image

    from metaformer import create_model, save_weights

    model = create_model("poolformer_s12", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    save_weights(model, tmp_path / "c.safetensors", class_names=["a", "b", "c"])
    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "one.png")
    code = (
        "import sys; from metaformer.cli import main; "
        "rc = main(sys.argv[1:]); print(' '.join(sorted(sys.modules))); sys.exit(rc)"
    )
    argv = ["classify", "predict", str(tmp_path / "one.png"), "--checkpoint", str(tmp_path / "c.safetensors"),
            "--backend", "torch", "--precision", "fp32"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    modules = set(run.stdout.strip().splitlines()[-1].split())
    assert "metaformer.tasks.classify.prediction" in modules
    heavy = ("torchvision", "timm", "sklearn", "matplotlib", "onnx", "onnxruntime", "openvino", "sympy")
    tasks = (
        "metaformer.tasks.detect",
        "metaformer.tasks.segment",
        "metaformer.export",
        "metaformer.data.folders",
    )
    assert sorted(modules & {*heavy, *tasks}) == []

"""cli.main's exit codes: 0 done, 1 a refused input or a failure (one sentence, no traceback), 2 a command
line argparse cannot read, 130 interrupted; ``--debug`` shows the traceback instead."""

from __future__ import annotations

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

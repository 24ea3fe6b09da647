"""What the benchmark smoke tests share: running a script with --quick and reading a row of its table."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, *args: str, home: Path | None = None, timeout: int = 240) -> str:
    """The script's stdout, run with ``args`` (``--quick`` when none) on one thread, with its own
    metaformer home when ``home`` is given; a failed run fails the test with the script's stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"METAFORMER_HOME": str(home)} if home else {}))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *(args or ("--quick",))],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def row(output: str, label: str) -> list[str]:
    lines = [line for line in output.splitlines() if line.startswith(label)]
    assert lines, f"no '{label}' row in:\n{output}"
    return lines[0][len(label) :].split()

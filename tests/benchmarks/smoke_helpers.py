"""What the benchmark smoke tests share: running a script with --quick and reading a row of its table."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def row(output: str, label: str) -> list[str]:
    lines = [line for line in output.splitlines() if line.startswith(label)]
    assert lines, f"no '{label}' row in:\n{output}"
    return lines[0][len(label) :].split()

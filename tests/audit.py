"""Report the tests that skip here: ``python tests/audit.py`` (not collected by pytest; exit 1 on a finding).

No test may skip on this machine for a reason other than a missing GPU, device or compiler: the ``skip`` /
``skipif`` marks are evaluated on every collected test (so run it on a CPU machine), and the reasons of
``pytest.skip(...)`` calls inside test bodies are listed for reading. Which tests skip depends on what
the machine has installed, so this is a printed report rather than a test; the other rule, that every
test asserts something, is the test ``tests/test_assertions.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# a skip for one of these reasons is a GPU/device test on a CPU machine, or a machine without a compiler
ALLOWED = ("cuda", "gpu", "device", "compiler", "interpreter", "run directly", "runs the child")


class _SkipAudit:
    def __init__(self) -> None:
        self.skipping: list[str] = []

    def pytest_collection_modifyitems(self, items):
        for item in items:
            for mark in item.iter_markers():
                if mark.name not in ("skip", "skipif"):
                    continue
                condition = mark.args[0] if mark.args else mark.kwargs.get("condition", True)
                reason = str(mark.kwargs.get("reason", mark.args[1] if len(mark.args) > 1 else ""))
                if mark.name == "skip" or (not isinstance(condition, str) and bool(condition)):
                    if not any(word in reason.lower() for word in ALLOWED):
                        self.skipping.append(f"{item.nodeid}: {reason}")


def skipping_here() -> list[str]:
    audit = _SkipAudit()
    pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", str(TESTS)], plugins=[audit])
    return audit.skipping


def runtime_skips() -> list[str]:
    found = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "skip"
            ):
                reason = ast.unparse(node.args[0]) if node.args else ""
                found.append(f"{path.relative_to(TESTS.parent)}:{node.lineno}: pytest.skip({reason})")
    return found


def main() -> int:
    skipping = skipping_here()
    print(f"tests whose skip condition holds here for another reason than a GPU/compiler: {len(skipping)}",
          *skipping, sep="\n  ")  # fmt: skip
    print("pytest.skip calls in test bodies (read their conditions):", *runtime_skips(), sep="\n  ")
    return 1 if skipping else 0


if __name__ == "__main__":
    sys.exit(main())

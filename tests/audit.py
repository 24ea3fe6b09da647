"""Look for tests that cannot fail: ``python tests/audit.py`` (not collected by pytest; exit 1 on a finding).

1. Every ``test_*`` function must assert something: an ``assert``, ``pytest.raises`` / ``warns`` /
   ``fail``, or a call to a function of the same file (or ``closed_form``) that does, followed
   transitively.
2. No test may skip on this machine for a reason other than a missing GPU, device or compiler: the
   ``skip`` / ``skipif`` marks are evaluated on every collected test (so run it on a CPU machine), and the
   reasons of ``pytest.skip(...)`` calls inside test bodies are listed for reading.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CHECKS = {"raises", "warns", "fail", "approx", "assert_close", "opcheck"}  # calls that raise on failure
# a skip for one of these reasons is a GPU/device test on a CPU machine, or a machine without a compiler
ALLOWED = ("cuda", "gpu", "device", "compiler", "interpreter", "run directly", "runs the child")


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.setdefault(node.name, node)
    return found


def _asserts_directly(node: ast.AST) -> bool:
    for child in ast.walk(node):
        if isinstance(child, ast.Assert):
            return True
        if isinstance(child, ast.Raise) and "AssertionError" in ast.unparse(child):
            return True
        if isinstance(child, ast.Call):
            func = child.func
            if isinstance(func, ast.Attribute) and func.attr in CHECKS:
                return True
    return False


def _called_names(node: ast.AST) -> set[str]:
    names = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Call):
            func = child.func
            if isinstance(func, ast.Name):
                names.add(func.id)
            elif isinstance(func, ast.Attribute):
                names.add(func.attr)  # closed_form.x, self.helper, module.helper
    return names


def _asserts(name: str, functions: dict, cache: dict, seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``name`` asserts, itself or through a function of ``functions`` it calls."""
    if name not in cache:
        node = functions[name]
        cache[name] = _asserts_directly(node) or any(
            _asserts(callee, functions, cache, seen | {name})
            for callee in _called_names(node)
            if callee in functions and callee not in seen | {name}
        )
    return cache[name]


def tests_without_assertions() -> list[str]:
    helpers = _functions(ast.parse((TESTS / "models" / "closed_form.py").read_text()))
    missing = []
    for path in sorted(TESTS.rglob("test_*.py")):
        functions = {**helpers, **_functions(ast.parse(path.read_text()))}
        cache: dict[str, bool] = {}
        for name in functions:
            if name.startswith("test_") and not _asserts(name, functions, cache):
                missing.append(f"{path.relative_to(TESTS.parent)}::{name}")
    return missing


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
    missing = tests_without_assertions()
    skipping = skipping_here()
    print(f"\ntests without an assertion: {len(missing)}", *missing, sep="\n  ")
    print(f"tests whose skip condition holds here for another reason than a GPU/compiler: {len(skipping)}",
          *skipping, sep="\n  ")  # fmt: skip
    print("pytest.skip calls in test bodies (read their conditions):", *runtime_skips(), sep="\n  ")
    return 1 if missing or skipping else 0


if __name__ == "__main__":
    sys.exit(main())

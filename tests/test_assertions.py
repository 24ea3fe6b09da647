"""Every test asserts something: an ``assert``, ``pytest.raises`` / ``warns`` / ``fail``, or a call to a
function of the same file (or of ``models/closed_form.py``) that does, followed transitively. A test
without one cannot fail. (``tests/audit.py`` reports the other half of the old audit, the tests that skip
on this machine, which depends on what the machine has installed.)"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHECKS = {"raises", "warns", "fail", "approx", "assert_close", "opcheck"}  # calls that raise on failure


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


def unasserted_tests(root: Path = TESTS) -> list[str]:
    """``path::name`` of every test function under ``root`` that asserts nothing, itself or via a helper."""
    closed_form = root / "models" / "closed_form.py"
    helpers = _functions(ast.parse(closed_form.read_text())) if closed_form.is_file() else {}
    missing = []
    for path in sorted(root.rglob("test_*.py")):
        functions = {**helpers, **_functions(ast.parse(path.read_text()))}
        cache: dict[str, bool] = {}
        for name in functions:
            if name.startswith("test_") and not _asserts(name, functions, cache):
                missing.append(f"{path.relative_to(root.parent)}::{name}")
    return missing


def test_every_test_asserts_something():
    missing = unasserted_tests()
    assert not missing, "tests without an assertion (they cannot fail): " + ", ".join(missing)


def test_checker_follows_helpers_and_finds_a_test_without_an_assertion(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n"
        "def check(v):\n    assert v\n"
        "def test_direct():\n    assert 1\n"
        "def test_raises():\n    with pytest.raises(ValueError):\n        int('x')\n"
        "def test_via_helper():\n    check(1)\n"
        "def test_nothing():\n    check  # named, never called\n"
    )
    assert unasserted_tests(tmp_path / "tests") == ["tests/test_x.py::test_nothing"]

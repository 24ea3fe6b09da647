"""Tasks that pair a MetaFormer backbone with a head: classify, detect, segment.

A task module marks its library functions with ``@command(name, ConfigClass, help)`` (train, eval,
predict: each takes one config dataclass and returns a result), writes ``<name>_report(result) -> str``
for the terminal, and declares ``COMMANDS = TaskCommands(__name__, task, help, description)``. The
CLI builds ``metaformer <task> <name>`` from that, flags and all (see ``metaformer.options``). A new
task is one module plus one line in ``TASK_MODULES`` (or a ``register_task`` call); a task that outgrows
one module becomes a package (``tasks/classify/``) whose ``__init__`` re-exports its functions. Each task
here is a package; ``tasks.dense`` holds what detect and segment share and is the one task package the
others may import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

TASK_MODULES: list[str] = [
    "metaformer.tasks.classify",
    "metaformer.tasks.detect",
    "metaformer.tasks.segment",
]
# modules whose commands sit at the top level (``metaformer ablate``, ``metaformer export``)
TOOL_MODULES: list[str] = ["metaformer.ablate", "metaformer.export"]
# the first command word -> the module that declares it, so that ``metaformer classify predict`` imports
# the classify package alone (a task module imports its data and training libraries: seconds); a word
# not found here builds every module's commands (tests/test_cli.py keeps this index true)
COMMAND_MODULES: dict[str, str] = {
    "classify": "metaformer.tasks.classify",
    "detect": "metaformer.tasks.detect",
    "segment": "metaformer.tasks.segment",
    "ablate": "metaformer.ablate",
    "export": "metaformer.export",
}
# each command word's help line, for `metaformer --help` without importing the task modules (seconds);
# tests/test_cli_speed.py keeps it equal to what each module declares
COMMAND_HELP: dict[str, str] = {
    "classify": "train, evaluate and run image classifiers",
    "detect": "train, evaluate and run RetinaNet / Mask R-CNN detectors",
    "segment": "train, evaluate and run Semantic FPN segmenters",
    "ablate": "train the paper's Table 5 ablations (mixers, pool sizes, norms, activations, other, hybrids)",
    "export": "write a model as ONNX, OpenVINO IR or TorchScript (fp32/bf16/int8), checked",
}

JSON_HELP = {"train": "print the summary as JSON", "eval": "print the metrics as JSON"}


@dataclass(frozen=True)
class Action:
    """One ``metaformer <task> <name>`` command: ``run`` names the library function of the task module
    (looked up at call time, so tests can replace it) that takes the ``config`` dataclass; ``report``
    (default ``<name>_report``) the one that writes its result for the terminal. Under torchrun only
    rank 0 prints a training summary."""

    name: str
    config: type
    run: str
    help: str
    description: str | None = None
    report: str | None = None

    @property
    def report_function(self) -> str:
        return self.report or f"{self.name}_report"

    @property
    def json_help(self) -> str:
        return JSON_HELP.get(self.name, "print JSON")

    @property
    def rank0_only(self) -> bool:
        return self.name == "train"


_ACTIONS: dict[str, list[Action]] = {}
F = TypeVar("F", bound=Callable[..., Any])


def command(name: str, config: type, help: str, description: str | None = None) -> Callable[[F], F]:
    """Declare the decorated function (which takes a ``config``) as ``metaformer <task> <name>``."""

    def mark(function: F) -> F:
        action = Action(name, config, function.__name__, help, description)
        _ACTIONS.setdefault(function.__module__, []).append(action)
        return function

    return mark


@dataclass(frozen=True)
class TaskCommands:
    """A task's command group: the commands ``module`` declares with ``@command``, in their order (read
    when the CLI is built, so ``COMMANDS`` may come first in the module). A task that is a package
    (``tasks/classify/``) declares them in its submodules, in the order it imports them, and re-exports
    the functions: the CLI calls them by name on ``module``. ``name=None``: they are top-level commands
    (a tool module's)."""

    module: str
    name: str | None
    help: str = ""
    description: str = ""

    @property
    def actions(self) -> tuple[Action, ...]:
        inside = f"{self.module}."
        return tuple(
            action
            for module, actions in _ACTIONS.items()
            if module == self.module or module.startswith(inside)
            for action in actions
        )


def register_task(module: str, name: str | None = None) -> None:
    """Add a task module (one that defines ``COMMANDS``) to the CLI, e.g. from a plugin or a test.
    ``name``, its command word, lets ``metaformer NAME ...`` import that module alone."""
    if module not in TASK_MODULES:
        TASK_MODULES.append(module)
    if name is not None:
        COMMAND_MODULES[name] = module


def command_modules(word: str | None) -> list[str]:
    """The modules the CLI imports to run ``metaformer WORD ...``: the one declaring WORD, none for the
    CLI's own commands (``builtin``), every module for anything else (``--help``, a typo)."""
    modules = [*TASK_MODULES, *TOOL_MODULES]
    module = COMMAND_MODULES.get(word or "")
    return [module] if module in modules else modules


__all__ = [
    "COMMAND_HELP",
    "COMMAND_MODULES",
    "Action",
    "TASK_MODULES",
    "TOOL_MODULES",
    "TaskCommands",
    "command",
    "command_modules",
    "register_task",
]

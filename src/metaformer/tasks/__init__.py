"""Tasks that pair a MetaFormer backbone with a head: classify, detect, segment.

A task module declares ``COMMANDS``, a ``TaskCommands`` naming its train / eval / predict actions: the
config dataclass each takes, the library function it calls and the function that writes its result
for the terminal. The CLI builds ``metaformer <task> <action>`` from it, flags and all (see
``metaformer.options``). A new task is one module plus one line in ``TASK_MODULES`` (or a
``register_task`` call).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASK_MODULES: list[str] = [
    "metaformer.tasks.classify",
    "metaformer.tasks.detect",
    "metaformer.tasks.segment",
]


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


@dataclass(frozen=True)
class TaskCommands:
    name: str
    help: str
    description: str
    actions: tuple[Action, ...] = field(default_factory=tuple)


def register_task(module: str) -> None:
    """Add a task module (one that defines ``COMMANDS``) to the CLI, e.g. from a plugin or a test."""
    if module not in TASK_MODULES:
        TASK_MODULES.append(module)


__all__ = ["Action", "TASK_MODULES", "TaskCommands", "register_task"]

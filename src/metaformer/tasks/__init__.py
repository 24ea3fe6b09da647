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


@dataclass(frozen=True)
class Action:
    """One ``metaformer <task> <name>`` command. ``run`` and ``report`` are names of functions in the task
    module (looked up at call time): ``run(config) -> result``, ``report(result) -> str``."""

    name: str
    config: type
    run: str
    report: str
    help: str
    description: str | None = None
    json_help: str = "print the result as JSON"
    rank0_only: bool = False  # training under torchrun: only rank 0 prints


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

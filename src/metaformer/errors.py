"""Typed exceptions. The library raises these with one sentence naming the problem and the fix;
only the CLI turns them into exit codes."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from typing import Any


class MetaformerError(Exception):
    """Base class of every error metaformer raises on purpose."""


class UnknownModelError(MetaformerError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(MetaformerError, ValueError):
    """An option out of range or an unknown override."""


class InputSizeError(MetaformerError, ValueError):
    """An input the model cannot take (too small, wrong channels, wrong fixed size)."""


class CheckpointError(MetaformerError, ValueError):
    """A checkpoint that is missing, unreadable, unsafe, or does not fit the model."""


class DownloadError(MetaformerError, OSError):
    """A download that failed (offline, HTTP error, hash mismatch)."""


class DataError(MetaformerError, ValueError):
    """A data set that is missing, empty, corrupt or malformed."""


class ExportError(MetaformerError):
    """An exported model that fails its check (onnx checker, or outputs that differ from PyTorch)."""


class WriteError(MetaformerError, OSError):
    """A file that could not be written: the disk is full, or its folder is read-only or gone."""


def close_matches_hint(name: str, candidates: Iterable[str]) -> str:
    """' did you mean 'x' or 'y'?' (or '') for error messages."""
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ConfigError naming ``name`` unless ``value`` (a number or a sequence of them; None passes) is finite
    and within ``low``..``high`` (ends excluded with ``low_open`` / ``high_open``).

    Every config checks its numbers through here because NaN compares false with everything, so a plain
    ``if value <= 0: raise`` lets NaN (and ``value > 0`` lets inf) through to training.
    """
    if value is None:
        return
    for v in value if isinstance(value, (tuple, list)) else (value,):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (low is None or (v > low if low_open else v >= low))
        ok = ok and (high is None or (v < high if high_open else v <= high))
        if not ok:
            shown = list(value) if isinstance(value, (tuple, list)) else value
            raise ConfigError(f"{name} must be {_range_text(low, high, low_open, high_open)}, got {shown}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    """ConfigError naming ``name`` and the choices unless ``value`` is one of them."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got '{value}'")


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        if low is None:
            return "a finite number"
        if low == 0:
            return "positive" if low_open else "zero or positive"
        return f"above {low:g}" if low_open else f"at least {low:g}"
    if low is None:
        return f"below {high:g}" if high_open else f"at most {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


_WORKER_HEADER = re.compile(r"Caught (\w+) in DataLoader worker process \d+")


def from_worker(err: BaseException) -> BaseException:
    """The error a DataLoader worker raised, rebuilt from torch's wrapper (or ``err`` when it is not one).

    torch re-raises a worker's exception as the same type with the worker's whole traceback as its
    message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), or as a
    RuntimeError when that type cannot be built from one string. The traceback's last block ends with
    the original "module.Type: message"; this returns ``Type(message)``, so the user reads the same one
    sentence whatever the number of workers.
    """
    text = str(err)
    header = _WORKER_HEADER.match(text)
    if header is None:
        return err
    name = header.group(1)
    lines = text.rstrip().splitlines()
    pattern = re.compile(rf"^(?:[A-Za-z_][\w.]*\.)?{re.escape(name)}(?:: (.*))?$")
    for i in range(len(lines) - 1, 0, -1):
        found = pattern.match(lines[i])
        if found:
            message = "\n".join([found.group(1) or "", *lines[i + 1 :]]).strip()
            break
    else:
        return err
    # The wrapper's traceback runs into the loader's iterator, whose frames are done: dropped now, the
    # iterator shuts its workers down at once. Left to a later garbage collection (the traceback holds
    # a cycle), the iterator's queues may be closed first and it then waits 5 s for each worker.
    err.__traceback__ = None
    if type(err).__name__ == name:
        try:
            return type(err)(message)
        except Exception:  # noqa: BLE001 - a type that takes other arguments: keep the wrapper
            return err
    return type(err)(f"{name}: {message}")

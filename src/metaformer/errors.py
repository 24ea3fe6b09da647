"""Typed exceptions. The library raises these with one sentence naming the problem and the fix;
only the CLI turns them into exit codes."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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


def close_matches_hint(name: str, candidates: Iterable[str]) -> str:
    """' did you mean 'x' or 'y'?' (or '') for error messages."""
    matches = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"

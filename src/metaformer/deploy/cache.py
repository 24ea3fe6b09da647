"""The deployment cache: exported and quantized models kept on disk and reused.

Exporting a PoolFormer-S12 to ONNX and checking it takes seconds, quantizing it to int8 tens of
seconds, while the forward it serves may take milliseconds: rebuilding the artefact on every
``classify predict`` call spent about 4 s to save 5 ms. So each built artefact (the ONNX file, the
OpenVINO IR, the QDQ file) goes to ``$METAFORMER_HOME/deploy/<key>/`` (default
``~/.cache/metaformer/deploy``) with a ``meta.json`` recording how it was checked and what building
and loading it cost. The key is a hash of everything that makes the artefact what it is: the weights
(their hash, and the model's structure), the input size, backend and precision, the calibration set,
the CPU (its signature), and the versions of metaformer, torch and the runtime. An entry is built in a
temp folder and renamed into place whole, so a reader never sees a half-written one; a cache folder
that cannot be written only costs a rebuild next time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaformer.models.routes import write_json_atomic

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    from metaformer.weights.download import cache_dir

    return cache_dir() / "deploy"


_DIGESTS: dict[tuple[int, tuple[tuple[int, int, torch.dtype], ...]], str] = {}


def weights_digest(model: nn.Module) -> str:
    """A hash of ``model``'s structure and every tensor in its state dict (its checkpoint's identity);
    remembered per model until one of its tensors changes (in place, which bumps its version, or
    replaced, as ``.to()`` does)."""
    state = model.state_dict(keep_vars=True)
    memo = (id(model), tuple((t._version, t.data_ptr(), t.dtype) for t in state.values()))
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu").reshape(-1).contiguous()  # also channels-last and bf16 ones
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    _DIGESTS[memo] = digest.hexdigest()[:24]
    return _DIGESTS[memo]


def make_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Entry:
    """A cached artefact: its folder and what ``meta.json`` says about it."""

    folder: Path
    meta: dict[str, Any]


def lookup(key: str) -> Entry | None:
    folder = cache_root() / key
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return Entry(folder, meta) if isinstance(meta, dict) else None


@contextlib.contextmanager
def building(key: str | None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(a folder to build in, a meta dict to fill); on success the folder becomes the entry ``key``.

    ``key=None`` (caching off) or a cache folder that cannot be written: a temp folder, removed after.
    """
    root = cache_root()
    folder: Path | None = None
    if key is not None:
        try:
            root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        except OSError as error:
            logger.debug("deploy cache not writable (%s); building in a temp folder", error)
    keep = folder is not None
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="metaformer-deploy-"))
    meta: dict[str, Any] = {}
    try:
        yield folder, meta
        if keep:
            (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            try:
                os.replace(folder, root / key)  # type: ignore[operator]
                return
            except OSError:  # another process finished the same entry first: keep theirs
                pass
    finally:
        if (root / str(key)) != folder:
            shutil.rmtree(folder, ignore_errors=True)


def _costs_file() -> Path:
    return cache_root() / "costs.json"


def costs(backend: str, precision: str, shape: str = "") -> dict[str, float]:
    """The last measured one-off seconds of ``backend`` at ``precision`` here: ``build_s`` (export,
    quantize, check) and ``load_s`` (a cached artefact opened and compiled, or the fast path folded),
    for a model and input size (``shape``)."""
    try:
        values = json.loads(_costs_file().read_text()).get(f"{backend}|{precision}|{shape}", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return (
        {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if isinstance(values, dict)
        else {}
    )


def record_cost(backend: str, precision: str, shape: str = "", **seconds: float) -> None:
    """Best effort: remember one-off seconds (``build_s=`` or ``load_s=``) for ``costs``."""
    path = _costs_file()
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    entry = data.get(f"{backend}|{precision}|{shape}")
    entry = entry if isinstance(entry, dict) else {}
    entry.update({name: round(value, 3) for name, value in seconds.items()})
    data[f"{backend}|{precision}|{shape}"] = entry
    try:
        write_json_atomic(path, data)
    except OSError as error:
        logger.debug("deploy costs not written (%s)", error)


def record_choice(precision: str, shape: str, record: Mapping[str, Any]) -> None:
    """Best effort: keep the last choice among ``precision``'s candidates for a model and input size
    (``shape``) in ``choices.json``: each candidate's check, those dropped and why, the one chosen."""
    path = cache_root() / "choices.json"
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[f"{precision}|{shape}"] = dict(record)
    try:
        write_json_atomic(path, data)
    except OSError as error:
        logger.debug("deploy choices not written (%s)", error)


def clear() -> int:
    """Remove every cached artefact; returns how many entries went."""
    root = cache_root()
    entries = [path for path in root.iterdir() if path.is_dir()] if root.is_dir() else []
    for path in entries:
        shutil.rmtree(path, ignore_errors=True)
    return len(entries)


__all__ = [
    "Entry",
    "building",
    "cache_root",
    "clear",
    "costs",
    "lookup",
    "make_key",
    "record_choice",
    "record_cost",
    "weights_digest",
]

"""Reading and writing tensor files: the one place metaformer opens a checkpoint.

Checkpoints are data, not code: files load through safetensors or ``torch.load(weights_only=True)``
with no unsafe fallback. Every write goes to a temp file next to the target and is renamed into place,
so a crash mid-write never leaves a half-written file under the real name.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn

from metaformer.errors import CheckpointError, WriteError

logger = logging.getLogger(__name__)

FORMAT = "metaformer"  # safetensors metadata "format" value marking our own files
# Wrappers training scripts put around a state dict, in the order timm prefers them (EMA first).
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path``, on error it is removed.

    The temp name keeps the target's suffix (``.x.png.tmpab12.png``), so writers that pick a format
    from the extension (PIL, matplotlib) work unchanged. The parent folder is created if needed.
    A write that fails for lack of space (ENOSPC, or torch's serializer stopping mid-file) or because
    the folder is read-only or gone raises ``WriteError``: one sentence with the file, the free space,
    and that the previous file under ``path`` is untouched (it is: only the temp file was written).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
    except OSError as err:
        raise _write_error(path, err) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder went read-only or away: nothing left to clean
        if isinstance(err, Exception) and _is_write_failure(err, tmp):
            raise _write_error(path, err) from None
        raise


def leftover_temp_files(path: str | os.PathLike) -> list[Path]:
    """The temp files ``atomic_write`` left beside ``path`` when its process was killed mid-write (a
    SIGKILL or power loss skips the clean-up); safe to delete once no process writes ``path``."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp{glob.escape(path.suffix)}"))


# What torch's zip writer and safetensors say when the disk fills up mid-file (their errors carry no errno).
_FULL_DISK_TEXT = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")
_TORCH_WRITE_TEXT = ("inline_container.cc", "unexpected pos", "file write failed")
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FOLDER_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EEXIST)


def _is_write_failure(err: Exception, tmp: Path) -> bool:
    """A failure of the write itself, not of what the writer computed (an export check, a bad value)."""
    if not tmp.parent.is_dir():  # the folder went away mid-write (torch says "Parent directory ...")
        return True
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    if isinstance(err, OSError) and err.errno in _FOLDER_ERRNOS:
        return err.filename is None or Path(err.filename).parent == tmp.parent or not tmp.parent.is_dir()
    text = str(err).lower()
    return any(s in text for s in _FULL_DISK_TEXT) or any(s in text for s in _TORCH_WRITE_TEXT)


def _write_error(path: Path, err: BaseException) -> WriteError:
    folder = path.parent
    kept = f"the previous {path.name} is untouched" if path.is_file() else f"no {path.name} was written"
    code = getattr(err, "errno", None)
    if code in _FOLDER_ERRNOS or (code is None and not folder.is_dir()):
        if not folder.is_dir():
            problem = f"its folder '{folder}' no longer exists or is not a folder"
            fix = "recreate it or pass another --output"
        else:
            problem = f"its folder '{folder}' is read-only ({getattr(err, 'strerror', None) or err})"
            fix = "make it writable or pass another --output"
        return WriteError(f"cannot write '{path}': {problem}; {kept}; {fix}")
    return WriteError(
        f"cannot write '{path}': the disk is full ({_free_space(folder)} free where it goes); {kept}; "
        "free some space or pass another --output"
    )


def _free_space(folder: Path) -> str:
    """Free bytes on the drive holding ``folder`` (its nearest existing ancestor), human-readable."""
    for place in (folder, *folder.parents):
        try:
            free = shutil.disk_usage(place).free
        except OSError:
            continue
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if free >= size:
                return f"{free / size:.1f} {unit}"
        return f"{free} bytes"
    return "unknown"


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length followed by a JSON object."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint file '{path}' does not exist; check the path")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path '{path}' is not a file; pass the checkpoint file itself")


# Weight files of a hub-style folder (transformers' save_pretrained, ours), in the order they are tried.
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
FOLDER_CONFIG = "config.json"


def weights_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a hub-style folder its model.safetensors (else pytorch_model.bin)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in FOLDER_WEIGHTS:
        if (path / name).is_file():
            return path / name
    if any(path.glob("*.index.json")):
        raise CheckpointError(
            f"folder '{path}' holds a sharded checkpoint; metaformer reads one weights file, so merge the "
            "shards (or re-save with a larger max_shard_size) first"
        )
    raise CheckpointError(
        f"folder '{path}' has neither {' nor '.join(FOLDER_WEIGHTS)}; pass a save_pretrained folder or "
        "the checkpoint file itself"
    )


def read_folder_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config.json of a hub-style folder as a dict; None when ``path`` is a file or has none."""
    path = Path(path)
    config = path / FOLDER_CONFIG
    if not path.is_dir() or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read '{config}' ({err}); check that it is valid JSON") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{config}' holds a {type(data).__name__}, not a JSON object; check the file")
    return data


def read_checkpoint_extras(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` entry OpenMMLab training scripts save next to the state dict (CLASSES, PALETTE...).

    Empty for safetensors files and for checkpoints without one. Loaded with weights_only=True.
    """
    path = weights_file(path)
    _check_exists(path)
    if _is_safetensors(path):
        return {}
    obj = _torch_load(path)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; an unsafe pickle is refused, never retried unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        with open(path, "rb") as f:
            head = f.read(4)
        message = str(err)
        carries_code = "global" in message.lower() or head[:1] == b"\x80" or zipfile.is_zipfile(path)
        if carries_code:
            raise CheckpointError(
                f"'{path}' is a pickle with objects other than tensors (it could run code), and metaformer "
                "refuses to run code in a pickle; convert it to safetensors with a trusted tool, e.g. "
                "safetensors.torch.save_file(state_dict, 'weights.safetensors') where you trust the file"
            ) from None
        raise CheckpointError(
            f"'{path}' is not a PyTorch or safetensors checkpoint (unreadable pickle); check the file"
        ) from None
    except OSError as err:
        raise CheckpointError(
            f"cannot read '{path}' ({err.strerror or err}); check the file's permissions"
        ) from None
    except Exception as err:  # garbage bytes make the unpickler fail in many ways (EOF, Key, Index...)
        raise CheckpointError(
            f"'{path}' is not a PyTorch or safetensors checkpoint ({type(err).__name__}); "
            "check that the download finished and the path is right"
        ) from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Pick the state dict out of a training checkpoint and drop DDP / torch.compile prefixes."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                logger.debug("using the '%s' entry of %s", key, path)
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"'{path}' holds a {type(obj).__name__}, not a state dict of tensors; save model.state_dict()"
        )
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = str(key)
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        key = key.replace("._orig_mod.", ".")
        state[key] = value
    if not state:
        raise CheckpointError(f"'{path}' holds no tensors; is it a model checkpoint?")
    return state


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and safetensors metadata (empty for .pth files) of a checkpoint file or hub-style folder."""
    path = weights_file(path)
    _check_exists(path)
    if _is_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"'{path}' is not a PyTorch or safetensors checkpoint (safetensors says: {err}); "
                "check the file"
            ) from None
        return _unwrap(state, path), metadata
    return _unwrap(_torch_load(path), path), {}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .pth / .pth.tar / .bin checkpoint, safely, unwrapped and unprefixed."""
    return read_checkpoint(path)[0]


def _contiguous_unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory; give each its own contiguous CPU copy when needed."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        whole = storage.nbytes() == tensor.numel() * tensor.element_size()
        if storage.data_ptr() in seen or not whole:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write the model's weights as safetensors with what is needed to rebuild it (atomic).

    Metadata (all strings): format "metaformer", model_name, config (JSON of the full MetaFormer
    kwargs), class_names (JSON list), for a ``MetaFormerFeatures`` backbone its out_indices / out_norm,
    and any extra ``metadata`` (non-strings are JSON-encoded).
    """
    model = _unwrap_module(model)
    features = None
    if hasattr(model, "out_indices") and hasattr(model, "out_norms"):  # a MetaFormerFeatures backbone
        out_norm = getattr(model, "out_norm", None)
        features = {"out_indices": list(model.out_indices), "out_norm": out_norm}
    write_weights(
        model.state_dict(),
        path,
        model_name=str(getattr(model, "model_name", "") or ""),
        config=getattr(model, "model_config", None) or {},
        num_classes=getattr(model, "num_classes", None),
        class_names=class_names,
        metadata=metadata,
        features=features,
    )


def _unwrap_module(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile / EMA wrappers (it carries the name and config)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def write_weights(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    model_name: str,
    config: Mapping[str, Any],
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    features: Mapping[str, Any] | None = None,
) -> None:
    """``save_weights`` for a bare state dict (used by ``convert_checkpoint``)."""
    from safetensors.torch import save_file

    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if num_classes and len(class_names) != num_classes:
            raise CheckpointError(
                f"{len(class_names)} class names given but the model has {num_classes} classes; "
                "pass one name per class"
            )
    meta: dict[str, str] = {}
    for key, value in (metadata or {}).items():
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    meta.update(
        format=FORMAT,
        model_name=model_name,
        config=json.dumps(dict(config), default=str),
        class_names=json.dumps(class_names),
    )
    if features is not None:
        meta["features"] = json.dumps(dict(features), default=str)
    tensors = _contiguous_unshared(state)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


class WeightsMetadata(TypedDict, total=False):
    """The metadata ``save_weights`` stores, as ``read_metadata`` gives it back: the JSON fields decoded
    (here, once), any other extra (a task's own records) as the string it was stored as."""

    format: str
    model_name: str
    config: dict[str, Any]  # the full MetaFormer keyword arguments
    class_names: list[str] | None
    features: dict[str, Any] | None  # out_indices / out_norm of a features backbone
    preprocessing: dict[str, Any]  # the eval transform (timm data-config keys), where one was stored
    task: str  # "detect", "segment" (a classifier's may say "classify" or nothing)


def decode_metadata(raw: Mapping[str, str], path: str | os.PathLike) -> WeightsMetadata:
    """The stored strings of one of our files (``read_checkpoint``'s metadata) as a ``WeightsMetadata``."""
    meta: dict[str, Any] = dict(raw)
    try:
        meta["config"] = json.loads(raw.get("config") or "{}")
        meta["class_names"] = json.loads(raw.get("class_names") or "null")
        meta["features"] = json.loads(raw["features"]) if "features" in raw else None
        if "preprocessing" in raw:
            meta["preprocessing"] = json.loads(raw["preprocessing"])
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"'{path}' has malformed metaformer metadata ({err}); re-save the weights"
        ) from None
    return meta  # type: ignore[return-value]


def read_metadata(path: str | os.PathLike) -> WeightsMetadata:
    """Metadata of a file written by ``save_weights``.

    Keys: "model_name", "config" (dict), "class_names" (list or None), "features" (dict with
    out_indices / out_norm for a features backbone, else None), "preprocessing" (dict, where stored),
    plus any other extras as strings.
    """
    path = Path(path)
    _check_exists(path)
    from safetensors import SafetensorError, safe_open

    not_ours = (
        f"'{path}' is not a metaformer weights file (no 'format: metaformer' safetensors metadata); "
        "convert it with `metaformer convert SRC DST` or load it with load_weights"
    )
    if not _is_safetensors(path):
        raise CheckpointError(not_ours)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"'{path}' is not a readable safetensors file ({err}); check the file"
        ) from None
    if raw.get("format") != FORMAT:
        raise CheckpointError(not_ours)
    return decode_metadata(raw, path)


def save_state(obj: Any, path: str | os.PathLike) -> None:
    """torch.save a training state (tensors and plain Python values only) atomically.

    Anything else (an argparse Namespace, a class) would not reload with ``weights_only=True``, so it
    is rejected here, at save time, rather than when resuming.
    """
    _check_plain(obj, "state")
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _check_plain(key, where)
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__name__}; training states hold only tensors and plain Python values "
        "(convert it, e.g. vars(namespace) or a dict), so they reload with weights_only=True"
    )


def load_state(path: str | os.PathLike) -> Any:
    """Read a file written by ``save_state`` (weights_only=True; CheckpointError when unreadable)."""
    path = Path(path)
    _check_exists(path)
    return _torch_load(path)

"""torch.compile with its caches under the metaformer home, and eager when compiling fails.

Inductor keeps its compiled kernels in ``TORCHINDUCTOR_CACHE_DIR`` (default: a folder under /tmp that a
reboot empties); ``enable_compile_caches`` points it, and Triton's cache, at ``<metaformer home>/inductor``
so the second run of the same model and shape starts from cache. Where the installed torch has them,
PyTorch's portable cache artefacts (``torch.compiler.save_cache_artifacts``) are saved per ``key`` in
``<dir>/artifacts/<key>.bin`` after the first compiled call and loaded before the next build.

``compile_module`` returns a ``CompiledModule``: it shares its parameters with the eager module (its
``state_dict`` has the eager keys, without ``_orig_mod.``), and if compiling or the first compiled call
raises (no C compiler, an Inductor or Dynamo error) it warns once, naming the reason and ``--compile off``,
and runs eager from then on.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaformer.options import COMPILE_MODES
from metaformer.weights.download import cache_dir as metaformer_home
from metaformer.weights.io import atomic_write

logger = logging.getLogger(__name__)

COMPILE_CHOICES: tuple[str, ...] = COMPILE_MODES  # --compile's values; options.py (torch-free) owns them

_CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def _user_values() -> dict[str, str | None]:
    """What the user set before this module was imported (never replaced); Inductor writes its default
    folder into the variable when it first opens its cache, and that one is not the user's."""
    found = {name: os.environ.get(name) for name in _CACHE_VARS}
    inductor = found["TORCHINDUCTOR_CACHE_DIR"]
    # Inductor can only have written its default here if this process imported it (importing it just
    # to ask costs sympy, which predict never needs); an inherited value was set on purpose
    if inductor is not None and "torch._inductor" in sys.modules:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.path.abspath(inductor) == os.path.abspath(default_cache_dir()):
            found = {name: None for name in _CACHE_VARS}
    return found


_USER_SET = _user_values()


def inductor_cache_dir(home: Path | None = None) -> Path:
    """``<metaformer home>/inductor`` (home: ``$METAFORMER_HOME`` or ``~/.cache/metaformer``)."""
    return Path(home if home is not None else metaformer_home()) / "inductor"


def enable_compile_caches(home: Path | None = None) -> Path:
    """Point Inductor's and Triton's caches under the metaformer home (unless the user set
    ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR``) and return Inductor's cache folder.

    Inductor reads the variables each time it opens its cache, so this works any time before the first
    compile. Calling it again is harmless; a new ``home`` moves the caches there.
    """
    inductor = _cache_root(home)
    if _USER_SET["TORCHINDUCTOR_CACHE_DIR"] is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    if _USER_SET["TRITON_CACHE_DIR"] is None:
        os.environ["TRITON_CACHE_DIR"] = str(inductor / "triton")
    return inductor


def _cache_root(home: Path | None) -> Path:
    """Inductor's cache folder: the user's ``TORCHINDUCTOR_CACHE_DIR``, else under the metaformer home."""
    user_set = _USER_SET["TORCHINDUCTOR_CACHE_DIR"]
    return Path(user_set) if user_set else inductor_cache_dir(home)


def artifacts_path(key: str, home: Path | None = None) -> Path:
    """Where the portable cache artefacts of ``key`` are saved (nothing is created or set)."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", key)
    return _cache_root(home) / "artifacts" / f"{safe}.bin"


def load_artifacts(key: str, home: Path | None = None) -> bool:
    """Load the portable cache artefacts saved for ``key``; True when some were found and loaded."""
    loader = getattr(torch.compiler, "load_cache_artifacts", None)
    path = artifacts_path(key, home)
    if loader is None or not path.is_file():
        return False
    try:
        return loader(path.read_bytes()) is not None
    except Exception as err:  # a stale or foreign file must not stop a run: it is rebuilt
        logger.info("ignored the compile cache artefacts in %s (%s)", path, err)
        return False


def save_artifacts(key: str, home: Path | None = None) -> Path | None:
    """Save this process's portable cache artefacts for ``key`` (atomically); None where torch has none."""
    saver = getattr(torch.compiler, "save_cache_artifacts", None)
    if saver is None:
        return None
    try:
        saved = saver()
    except Exception as err:
        logger.info("could not collect the compile cache artefacts (%s)", err)
        return None
    if saved is None:
        return None
    path = artifacts_path(key, home)
    try:
        with atomic_write(path) as tmp:
            tmp.write_bytes(saved[0])
    except Exception as err:  # a full or read-only disk costs the next run a cold compile, nothing else
        logger.info("could not save the compile cache artefacts to %s (%s)", path, err)
        return None
    return path


def _reason(err: BaseException) -> str:
    """One line: the innermost error's type and first line (Dynamo wraps a backend's error)."""
    inner = getattr(err, "inner_exception", None)
    while isinstance(inner, BaseException):
        err, inner = inner, getattr(inner, "inner_exception", None)
    text = str(err).strip().splitlines()
    first = next((line.strip() for line in text if line.strip()), "")
    return f"{type(err).__name__}: {first[:160]}" if first else type(err).__name__


def _is_compile_error(err: BaseException) -> bool:
    """An error of Dynamo or Inductor (not of the model's own code)."""
    from torch._dynamo import exc

    inductor_error = getattr(sys.modules.get("torch._inductor.exc"), "InductorError", None)
    return isinstance(err, exc.TorchDynamoException) or (
        inductor_error is not None and isinstance(err, inductor_error)
    )


class CompiledModule(nn.Module):
    """``module`` run through ``torch.compile``, or eager once compiling has failed.

    ``module`` is the only registered child (the compiled callable is kept outside ``_modules``), and
    ``state_dict`` / ``load_state_dict`` are ``module``'s own: the same tensors and the eager keys, so
    optimizer, EMA and checkpoints never see the wrapper. ``compile_seconds``: wall time of
    the first compiled call (compile + run); ``cache_hit``: saved artefacts were found and loaded;
    ``compiled``: still running compiled (False after a fallback); ``failure``: why it fell back.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        key: str,
        freezing: bool = False,
        dynamic: bool | None = False,
        options: dict | None = None,
        backend: str = "inductor",
        home: Path | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.key = key
        self.home = home
        self.compile_seconds: float | None = None
        self.cache_hit = False
        self.failure: str | None = None
        self._calls = 0
        options = dict(options or {})
        # Dynamo reads Inductor's global ``freezing`` when it traces (``options`` reach Inductor only), so
        # it is also patched around every compiled call: without it the weights stay graph inputs
        self.freezing = bool(freezing) and backend == "inductor"
        if self.freezing:
            options["freezing"] = True
        self.cache_hit = load_artifacts(key, home)
        try:
            kwargs: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
            if options and backend == "inductor":
                kwargs["options"] = options
            compiled = torch.compile(module, **kwargs)
        except Exception as err:
            compiled = None
            self.fall_back(err)
        self.__dict__["_compiled"] = compiled  # not a submodule: parameters and state_dict stay module's

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def fall_back(self, err: BaseException) -> None:
        """Run eager from now on, after one warning that names the reason and the fix."""
        self.__dict__["_compiled"] = None
        self.failure = _reason(err)
        logger.warning(
            "torch.compile failed (%s), so the model runs eager; pass --compile off to skip compiling",
            self.failure,
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self.module(*args, **kwargs)
        self._calls += 1
        start = time.perf_counter()
        try:
            if self.freezing:
                from torch._inductor import config as inductor_config

                with inductor_config.patch(freezing=True):
                    out = self._compiled(*args, **kwargs)
            else:
                out = self._compiled(*args, **kwargs)
        except Exception as err:
            # the first calls compile (any error there is the compiler's); later, a recompile for a new
            # shape can fail too, but other errors are the model's own and are raised as they are
            if self._calls > 2 and not _is_compile_error(err):
                raise
            self.fall_back(err)
            return self.module(*args, **kwargs)
        if self._calls == 1:
            self.compile_seconds = time.perf_counter() - start
        if self._calls <= 2:
            # saved after the first call, and again after the second, when a training step's lazily
            # compiled backward has joined the cache
            save_artifacts(self.key, self.home)
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def compile_module(
    module: nn.Module,
    *,
    key: str,
    freezing: bool = False,
    dynamic: bool | None = False,
    options: dict | None = None,
    backend: str = "inductor",
    home: Path | None = None,
) -> nn.Module:
    """``module`` compiled (lazily: the work happens on the first call), with the caches for ``key``
    under the metaformer home; eager after one warning if compiling fails.

    ``freezing`` (inference only) folds the weights into the graph as constants, as PyTorch's CPU
    guides recommend; ``backend`` other than inductor (``aot_eager``) is for tests and debugging.
    """
    enable_compile_caches(home)
    importlib.import_module("metaformer.models.kernels.native_ops")  # the custom ops compiled graphs call
    return CompiledModule(
        module, key=key, freezing=freezing, dynamic=dynamic, options=options, backend=backend, home=home
    )


def compile_cache_summary(home: Path | None = None) -> dict[str, Any]:
    """Where the compile cache is, how many files it holds and their total bytes."""
    folder = _cache_root(home)
    files = 0
    size = 0
    if folder.is_dir():
        for path in folder.rglob("*"):
            try:
                if path.is_file():
                    files += 1
                    size += path.stat().st_size
            except OSError:
                continue  # removed while we walked
    return {"path": str(folder), "files": files, "bytes": size}


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The eager module inside a ``CompiledModule`` (or ``module`` itself)."""
    return module.module if isinstance(module, CompiledModule) else module


__all__ = [
    "COMPILE_CHOICES",
    "artifacts_path",
    "CompiledModule",
    "compile_cache_summary",
    "compile_module",
    "enable_compile_caches",
    "inductor_cache_dir",
    "unwrap_compiled",
]

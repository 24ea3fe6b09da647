"""Building a backend's runner, and the deployment cache around it: an artefact (the exported graph, the
quantized model) is built once per weights, size, backend, precision, calibration set, CPU and
versions (``cache``), and loaded from there after. The compile backend's artefacts are Inductor's
caches, kept by ``metaformer.compiling`` under the same key (with the batch size the graph is
compiled for); its compile seconds are recorded under that key for ``one_off_s``."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from metaformer.deploy import backends

# one-off seconds assumed for a backend never built here, per precision (replaced by measured ones)
DEFAULT_BUILD_S = {"fp32": 5.0, "bf16": 5.0, "int8": 60.0}


def _cache_parts(
    model: nn.Module,
    backend: str,
    precision: str,
    size: tuple[int, int] | None,
    calibration: Any,
    batch_size: int | None = None,
) -> dict:
    """``size`` None: a graph that takes every image size. ``batch_size``: the one a graph is compiled
    for (the compile backend's; the runtimes' graphs take every batch size)."""
    from metaformer import __version__
    from metaformer.deploy.cache import weights_digest
    from metaformer.deploy.onnx_export import DEFAULT_OPSET, EXPORT_VERSION
    from metaformer.deploy.runtimes import runtime_version
    from metaformer.models.hardware import cpu_profile

    parts = {
        "weights": weights_digest(model),
        "img_size": "dynamic" if size is None else list(size),
        "backend": backend,
        "precision": precision,
        "calibration": calibration.digest() if precision == "int8" else None,
        "cpu": cpu_profile().signature,
        "metaformer": __version__,
        "torch": torch.__version__,
        "runtime": runtime_version(backend),
        "opset": DEFAULT_OPSET,
        "export": EXPORT_VERSION,
    }
    if batch_size is not None:
        parts["batch"] = int(batch_size)
    return parts


def compile_key(model: nn.Module, precision: str, size: tuple[int, int] | None, batch_size: int) -> str:
    """The deployment cache key the compile backend's Inductor caches and compile seconds are kept under."""
    from metaformer.deploy.cache import make_key

    return make_key(_cache_parts(model, "compile", precision, size, None, batch_size))


def shape_name(model: nn.Module, size: tuple[int, int] | None) -> str:
    name = getattr(model, "model_name", type(model).__name__)
    return f"{name}-dynamic" if size is None else f"{name}-{size[0]}x{size[1]}"


def cached_entry(
    model: nn.Module, backend: str, precision: str, size: tuple[int, int] | None, calibration: Any
) -> Any:
    """The cache entry holding ``backend``'s artefact for this model and precision, or None."""
    from metaformer.deploy import cache

    if not backends.backend(backend).caches_files:
        return None
    return cache.lookup(cache.make_key(_cache_parts(model, backend, precision, size, calibration)))


def build(
    model: nn.Module,
    backend: str,
    precision: str = "fp32",
    *,
    img_size: tuple[int, int] = (224, 224),
    batch_size: int = 1,
    threads: int | None = None,
    calibration: Any = None,
    use_cache: bool = True,
    images: int | None = None,
    dynamic_size: bool = False,
) -> nn.Module:
    """A runner of ``model`` on ``backend`` (not auto) at ``precision``: loaded from the cache when its
    artefact is there, else built (exported, quantized, checked against PyTorch) and cached.
    ``images``: how many the caller will run (at most ``batch_size``: the PyTorch model is not folded).
    ``dynamic_size``: the runner takes every image size (``img_size`` is the one it is built and
    checked at, with one more); one cached artefact serves them all."""
    from metaformer.deploy import cache
    from metaformer.deploy.quantize import as_calibration, require_calibration

    chosen = backends.backend(backend)
    chosen.check(precision)
    calibration = as_calibration(calibration)
    if precision == "int8":
        require_calibration(calibration)
    model = model.eval()
    h, w = int(img_size[0]), int(img_size[1])
    key_size = None if dynamic_size else (h, w)
    in_chans = getattr(model, "in_chans", 3)
    if chosen.compiles:
        return _build_compiled(model, chosen, precision, (h, w), key_size, batch_size, threads)
    if not chosen.caches_files:
        start = time.perf_counter()
        one_batch = images is not None and images <= batch_size
        example = torch.zeros(batch_size, in_chans, h, w)
        runner = chosen.build(
            model, precision, example, threads=threads, one_batch=one_batch, calibration=calibration
        )
        if not one_batch:  # the fold's cost, what a longer run pays before its first batch
            seconds = time.perf_counter() - start
            cache.record_cost(backend, precision, shape_name(model, key_size), load_s=seconds)
        return runner
    key = (
        cache.make_key(_cache_parts(model, backend, precision, key_size, calibration)) if use_cache else None
    )
    entry = cache.lookup(key) if key else None
    if entry is not None:
        start = time.perf_counter()
        runner = chosen.load(entry.folder, precision, threads=threads)
        runner.check = entry.meta.get("check", {})
        cache.record_cost(backend, precision, shape_name(model, key_size), load_s=time.perf_counter() - start)
        return runner
    example = torch.zeros(batch_size, in_chans, h, w)
    start = time.perf_counter()
    with cache.building(key) as (folder, meta):
        runner = chosen.build(
            model.cpu().float(), precision, example, threads=threads, calibration=calibration, folder=folder,
            dynamic_size=dynamic_size,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        meta.update(
            parts=_cache_parts(model, backend, precision, key_size, calibration),
            check=runner.check,
            settings=runner.settings,
            build_s=round(seconds, 3),
        )
    cache.record_cost(backend, precision, shape_name(model, key_size), build_s=seconds)
    return runner


def _build_compiled(
    model: nn.Module,
    backend: Any,
    precision: str,
    img_size: tuple[int, int],
    key_size: tuple[int, int] | None,
    batch_size: int,
    threads: int | None,
) -> nn.Module:
    """The compile backend's runner, its compile seconds recorded under its key: ``build_s`` for the
    first (cold) compile here, ``load_s`` for a later one, which Inductor's caches make warm.
    ``settings["warm"]``: this key was compiled here before."""
    from metaformer.deploy import cache

    key = compile_key(model, precision, key_size, batch_size)
    warm = bool(cache.costs(backend.name, precision, key))
    example = torch.zeros(batch_size, getattr(model, "in_chans", 3), *img_size)
    runner = backend.build(
        model.cpu().float(), precision, example, key=key, threads=threads, dynamic_size=key_size is None
    )
    runner.settings["warm"] = warm
    seconds = runner.settings.get("compile_s")
    if seconds is not None and runner.settings.get("compiled"):
        cache.record_cost(backend.name, precision, key, **{"load_s" if warm else "build_s": seconds})
    return runner


def compile_cost_s(
    model: nn.Module, precision: str, size: tuple[int, int] | None, batch_size: int
) -> tuple[float, bool]:
    """The compile backend's one-off seconds, estimated before compiling, and whether Inductor's caches
    hold its key (it was compiled here before): the last warm compile recorded for the key, else
    ``WARM_COMPILE_S`` after a cold one, else ``COLD_COMPILE_S``."""
    from metaformer.deploy import cache
    from metaformer.deploy.backend_compile import COLD_COMPILE_S, WARM_COMPILE_S

    costs = cache.costs("compile", precision, compile_key(model, precision, size, batch_size))
    if not costs:
        return COLD_COMPILE_S, False
    return costs.get("load_s", WARM_COMPILE_S), True


def one_off_s(
    model: nn.Module,
    backend: str,
    precision: str,
    size: tuple[int, int] | None,
    calibration: Any,
    batch_size: int = 1,
) -> float:
    """Seconds ``backend`` costs before its first batch: loading a cached artefact, building one, or
    compiling (for ``batch_size``)."""
    from metaformer.deploy import cache

    if backends.backend(backend).compiles:
        return compile_cost_s(model, precision, size, batch_size)[0]
    costs = cache.costs(backend, precision, shape_name(model, size))
    if not backends.backend(backend).caches_files:
        return costs.get("load_s", 0.2)
    if precision == "int8" and calibration is None:
        return math.inf
    if cached_entry(model, backend, precision, size, calibration) is not None:
        return costs.get("load_s", 0.5)
    return costs.get("build_s", DEFAULT_BUILD_S[precision])


__all__ = ["DEFAULT_BUILD_S", "build", "cached_entry", "compile_cost_s", "compile_key", "one_off_s"]

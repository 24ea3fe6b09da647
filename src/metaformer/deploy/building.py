"""Building a backend's runner, and the deployment cache around it: an artefact (the exported graph, the
quantized model) is built once per weights, size, backend, precision, calibration set, CPU and
versions (``cache``), and loaded from there after."""

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
    model: nn.Module, backend: str, precision: str, size: tuple[int, int] | None, calibration: Any
) -> dict:
    """``size`` None: a graph that takes every image size."""
    from metaformer import __version__
    from metaformer.deploy.cache import weights_digest
    from metaformer.deploy.onnx_export import DEFAULT_OPSET, EXPORT_VERSION
    from metaformer.deploy.runtimes import runtime_version
    from metaformer.models.hardware import cpu_profile

    return {
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


def one_off_s(
    model: nn.Module, backend: str, precision: str, size: tuple[int, int] | None, calibration: Any
) -> float:
    """Seconds ``backend`` costs before its first batch: loading a cached artefact, or building one."""
    from metaformer.deploy import cache

    costs = cache.costs(backend, precision, shape_name(model, size))
    if not backends.backend(backend).caches_files:
        return costs.get("load_s", 0.2)
    if precision == "int8" and calibration is None:
        return math.inf
    if cached_entry(model, backend, precision, size, calibration) is not None:
        return costs.get("load_s", 0.5)
    return costs.get("build_s", DEFAULT_BUILD_S[precision])


__all__ = ["DEFAULT_BUILD_S", "build", "cached_entry"]

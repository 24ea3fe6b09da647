"""Deployment: run a trained model on the fastest backend and precision this machine has.

The layer below the tasks (classify eval and predict call ``prepare_for_inference``, the export
command calls ``export_model`` and ``build``); it imports no task. One module per backend behind one
interface (``base``): ``backend_torch`` (our fast path, fp32/bf16), ``backend_onnxruntime`` (fp32 and
QDQ int8), ``backend_openvino`` (fp32/bf16 and NNCF int8); beside them ``onnx_export`` (the folded,
checked ONNX graph every runtime starts from), ``quantize`` (calibration and the quantizers),
``runtimes`` (how sessions are opened) and ``cache`` (artefacts kept by the weights' hash).

``backend="auto"`` measures every backend that can run the precision on the real batch shape the
first time (route ``backend`` in ``models.routes``, cached per machine), and weighs a backend's
one-off cost (building or loading its artefact) against the time it saves over the work announced
by ``images``: a single image is not worth a 4 s export to save 5 ms.

Models: a classifier, or any model holding a MetaFormer backbone whose outputs are logits, such as the
Semantic FPN segmenter (``dynamic_size=True``: its exported graph takes every image height and width,
so images that differ in size after the keep-ratio resize share one artefact).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from metaformer.errors import ConfigError, ExportError, check_choice

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
_MODULES = {
    "torch": "metaformer.deploy.backend_torch",
    "onnxruntime": "metaformer.deploy.backend_onnxruntime",
    "openvino": "metaformer.deploy.backend_openvino",
}
SMALL_WORK_BATCHES = 4  # work this small is not worth probing every backend (that builds each artefact)
# one-off seconds assumed for a backend never built here, per precision (replaced by measured ones)
DEFAULT_BUILD_S = {"fp32": 5.0, "bf16": 5.0, "int8": 60.0}


def backend_module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def _runnable(name: str, precision: str) -> bool:
    try:
        backend_module(name).check(precision)
    except (ConfigError, ImportError):
        return False
    return True


def candidates(precision: str) -> list[str]:
    """The backends that can run ``precision`` here, the default first."""
    order = ("openvino", "onnxruntime") if precision == "int8" else ("torch", "onnxruntime", "openvino")
    return [name for name in order if _runnable(name, precision)]


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


def _shape(model: nn.Module, size: tuple[int, int] | None) -> str:
    name = getattr(model, "model_name", type(model).__name__)
    return f"{name}-dynamic" if size is None else f"{name}-{size[0]}x{size[1]}"


def cached_entry(
    model: nn.Module, backend: str, precision: str, size: tuple[int, int] | None, calibration: Any
) -> Any:
    """The cache entry holding ``backend``'s artefact for this model and precision, or None."""
    from metaformer.deploy import cache

    if not backend_module(backend).ARTEFACT:
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

    module = backend_module(backend)
    module.check(precision)
    calibration = as_calibration(calibration)
    if precision == "int8":
        require_calibration(calibration)
    model = model.eval()
    h, w = int(img_size[0]), int(img_size[1])
    key_size = None if dynamic_size else (h, w)
    in_chans = getattr(model, "in_chans", 3)
    if not module.ARTEFACT:
        start = time.perf_counter()
        one_batch = images is not None and images <= batch_size
        example = torch.zeros(batch_size, in_chans, h, w)
        runner = module.build(
            model, precision, example, threads=threads, one_batch=one_batch, calibration=calibration
        )
        if not one_batch:  # the fold's cost, what a longer run pays before its first batch
            cache.record_cost(backend, precision, _shape(model, key_size), load_s=time.perf_counter() - start)
        return runner
    key = (
        cache.make_key(_cache_parts(model, backend, precision, key_size, calibration)) if use_cache else None
    )
    entry = cache.lookup(key) if key else None
    if entry is not None:
        start = time.perf_counter()
        runner = module.load(entry.folder, precision, threads=threads)
        runner.check = entry.meta.get("check", {})
        cache.record_cost(backend, precision, _shape(model, key_size), load_s=time.perf_counter() - start)
        return runner
    example = torch.zeros(batch_size, in_chans, h, w)
    start = time.perf_counter()
    with cache.building(key) as (folder, meta):
        runner = module.build(
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
    cache.record_cost(backend, precision, _shape(model, key_size), build_s=seconds)
    return runner


def _one_off_s(
    model: nn.Module, backend: str, precision: str, size: tuple[int, int] | None, calibration: Any
) -> float:
    """Seconds ``backend`` costs before its first batch: loading a cached artefact, or building one."""
    from metaformer.deploy import cache

    costs = cache.costs(backend, precision, _shape(model, size))
    if not backend_module(backend).ARTEFACT:
        return costs.get("load_s", 0.2)
    if precision == "int8" and calibration is None:
        return math.inf
    if cached_entry(model, backend, precision, size, calibration) is not None:
        return costs.get("load_s", 0.5)
    return costs.get("build_s", DEFAULT_BUILD_S[precision])


def prepare_for_inference(
    model: nn.Module,
    *,
    backend: str = "auto",
    precision: str = "fp32",
    device: torch.device | str = "cpu",
    img_size: tuple[int, int] = (224, 224),
    batch_size: int = 32,
    amp: torch.dtype | None = None,
    threads: int | None = None,
    calibration: Any = None,
    images: int | None = None,
    use_cache: bool = True,
    dynamic_size: bool = False,
    min_agreement: float | None = None,
) -> tuple[nn.Module, str]:
    """(a module to call on image batches, the backend it runs on) for an eval-mode ``model``.

    ``precision``: fp32 (exact outputs, the default), bf16, or int8 (post-training quantization
    calibrated on ``calibration``, an iterable of preprocessed image batches or a ``Calibration``).
    ``torch`` is our fast path (or, with ``amp``, the plain model under autocast); ``onnxruntime`` and
    ``openvino`` run the exported graph on the CPU; ``auto`` measures them. ``images``: how many images
    the caller will run (None: many), which decides whether a backend's one-off cost pays off.
    ``threads``: the runtimes' threads (default: PyTorch's). ``dynamic_size``: images of every size
    go through one runner (a segmenter's; ``img_size`` is a typical one, where auto measures).
    ``min_agreement``: the top-1 agreement with fp32 an int8 model needs on the calibration source's
    held-out images (None: 0.99 per image, 0.98 per pixel; ``agreement``): auto drops a candidate below
    it, a named backend runs after one warning sentence. The runner's ``choice`` records the candidates
    measured and those dropped, and why.
    """
    check_choice("backend", backend, BACKENDS)
    check_choice("precision", precision, PRECISIONS)
    if getattr(model, "exported", False):  # an exported folder's model (deploy.package) runs as it is
        if backend != "auto" or precision != "fp32" or amp is not None or torch.device(device).type != "cpu":
            raise ConfigError(
                f"'{model.folder}' holds an exported {model.backend} {model.precision} model, which runs as "
                "it is on the CPU; drop --backend, --precision, --amp and --device"
            )
        return model, model.backend
    device = torch.device(device)
    from metaformer.deploy.base import foldable

    if amp is not None:
        if precision != "fp32":
            raise ConfigError(f"pass either --amp or --precision {precision}, not both")
        if backend not in ("auto", "torch"):
            raise ConfigError(
                f"the {backend} backend runs in fp32; drop --amp (or use --precision) or use --backend torch"
            )
        return model, "torch"  # the plain model under the caller's autocast
    if device.type != "cpu":
        if backend not in ("auto", "torch") or precision == "int8":
            raise ConfigError(
                f"{'int8' if precision == 'int8' else f'the {backend} backend'} runs on the CPU; "
                "drop --device or use --backend torch"
            )
        from metaformer.deploy.backend_torch import TorchRunner, fold

        return TorchRunner(fold(model, precision), precision, threads), "torch"
    size = (int(img_size[0]), int(img_size[1]))
    calibration_set = _calibration(calibration)
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise ConfigError(f"min_agreement is a fraction from 0 to 1, such as 0.99, not {min_agreement}")
    if backend != "auto":
        runner = build(
            model, backend, precision, img_size=size, batch_size=batch_size, threads=threads,
            calibration=calibration_set, use_cache=use_cache, images=images, dynamic_size=dynamic_size,
        )  # fmt: skip
        if precision == "int8":
            from metaformer.deploy.agreement import threshold, warn_below

            warn_below(backend, precision, runner.check, min_agreement)
            runner.choice = {
                "min_agreement": threshold(min_agreement, str(runner.check.get("unit", "image"))),
                "candidates": {backend: dict(runner.check)},
                "dropped": {},
                "chosen": backend,
            }
        return runner, backend
    names = candidates(precision) if foldable(model) else (["torch"] if precision != "int8" else [])
    if not names:
        raise ConfigError(
            f"no installed backend runs {precision} here; pip install 'metaformer[openvino]' "
            "or use --precision fp32"
        )
    if precision == "int8" and calibration_set is None:
        raise ConfigError(
            "int8 needs calibration images: pass calibration= (image batches) in Python or "
            "--calibration-data DIR on the command line"
        )
    if precision == "int8":
        return _auto_int8(
            model, names, size, batch_size, threads, calibration_set, images, use_cache, dynamic_size,
            min_agreement,
        )  # fmt: skip
    if len(names) == 1:
        return _build_named(
            model, names[0], precision, size, batch_size, threads, calibration_set, use_cache, images,
            dynamic_size,
        )  # fmt: skip
    return _auto(
        model, names, precision, size, batch_size, threads, calibration_set, images, use_cache, dynamic_size
    )


def _calibration(calibration: Any) -> Any:
    from metaformer.deploy.quantize import as_calibration

    return as_calibration(calibration)


def _build_named(
    model: nn.Module, name: str, precision: str, size: tuple[int, int], batch_size: int, threads: int | None,
    calibration: Any, use_cache: bool, images: int | None = None, dynamic_size: bool = False,
) -> tuple[nn.Module, str]:  # fmt: skip
    runner = build(
        model, name, precision, img_size=size, batch_size=batch_size, threads=threads,
        calibration=calibration, use_cache=use_cache, images=images, dynamic_size=dynamic_size,
    )  # fmt: skip
    return runner, name


def _auto(
    model: nn.Module, names: list[str], precision: str, size: tuple[int, int], batch_size: int,
    threads: int | None, calibration: Any, images: int | None, use_cache: bool, dynamic_size: bool = False,
) -> tuple[nn.Module, str]:  # fmt: skip
    from metaformer.models import routes

    h, w = size
    key_size = None if dynamic_size else size
    shape_class = f"{getattr(model, 'model_name', type(model).__name__)}-{h}x{w}-b{routes.bucket(batch_size)}"
    if precision != "fp32":
        shape_class += f"-{precision}"
    batches = None if images is None else max(1, math.ceil(images / batch_size))
    decision = routes.known_decision("backend", shape_class, names)
    if decision is not None and decision.choice in names:
        choice = _weigh(model, decision, names, precision, key_size, calibration, batches)
        return _build_named(
            model, choice, precision, size, batch_size, threads, calibration, use_cache, images, dynamic_size
        )
    if batches is not None and batches <= SMALL_WORK_BATCHES:
        # measuring builds every backend's artefact: a short run takes one that needs none or is built
        ready = [
            name for name in names
            if not backend_module(name).ARTEFACT
            or cached_entry(model, name, precision, key_size, calibration)
        ]  # fmt: skip
        return _build_named(
            model, (ready or names)[0], precision, size, batch_size, threads, calibration, use_cache, images,
            dynamic_size,
        )  # fmt: skip
    runners: dict[str, nn.Module] = {}
    for name in names:
        try:
            runners[name] = build(
                model, name, precision, img_size=size, batch_size=batch_size, threads=threads,
                calibration=calibration, use_cache=use_cache, dynamic_size=dynamic_size,
            )  # fmt: skip
        except ExportError as error:  # its outputs were wrong: it is not a candidate
            logger.warning("%s backend skipped: %s", name, error)
    if not runners:
        raise ExportError(f"no backend could run {precision} with outputs matching PyTorch")
    example = torch.randn(batch_size, getattr(model, "in_chans", 3), h, w)
    with torch.no_grad():
        for runner in runners.values():
            runner(example)  # first calls (the fast path's own route probes) are not part of its time
        timed = {name: (lambda runner=runner: runner(example)) for name, runner in runners.items()}
        choice = routes.choose("backend", shape_class, timed, min_rounds=5)
    return runners[choice], choice


def _auto_int8(
    model: nn.Module, names: list[str], size: tuple[int, int], batch_size: int, threads: int | None,
    calibration: Any, images: int | None, use_cache: bool, dynamic_size: bool, min_agreement: float | None,
) -> tuple[nn.Module, str]:  # fmt: skip
    """The fastest int8 candidate whose held-out agreement with fp32 meets the threshold. A cached
    artefact's agreement is read from its cache entry (nothing is loaded); the others are built (and
    cached with theirs). A short run stops at the first candidate that passes, cached ones first."""
    from metaformer.deploy import cache
    from metaformer.deploy.agreement import none_passes, passes, threshold, why_dropped
    from metaformer.models import routes

    key_size = None if dynamic_size else size
    h, w = size
    batches = None if images is None else max(1, math.ceil(images / batch_size))
    cached = {
        name: entry.meta["check"]
        for name in names
        if use_cache
        and (entry := cached_entry(model, name, "int8", key_size, calibration)) is not None
        and isinstance(entry.meta.get("check"), dict)
        and "unit" in entry.meta["check"]
    }
    short = batches is not None and batches <= SMALL_WORK_BATCHES
    order = sorted(names, key=lambda name: name not in cached) if short else names
    checks: dict[str, dict[str, Any]] = {}
    runners: dict[str, nn.Module] = {}

    def runner_of(name: str) -> nn.Module:
        if name not in runners:
            runners[name] = build(
                model, name, "int8", img_size=size, batch_size=batch_size, threads=threads,
                calibration=calibration, use_cache=use_cache, images=images, dynamic_size=dynamic_size,
            )  # fmt: skip
        return runners[name]

    for name in order:
        try:
            checks[name] = dict(cached[name]) if name in cached else dict(runner_of(name).check)
        except ExportError as error:  # it could not be built here: not a candidate
            logger.warning("%s backend skipped: %s", name, error)
            continue
        if short and passes(checks[name], min_agreement):
            break
    passing = [name for name in order if name in checks and passes(checks[name], min_agreement)]
    dropped = {
        name: why_dropped(check, min_agreement) for name, check in checks.items() if name not in passing
    }
    for name, why in dropped.items():
        logger.debug("int8 %s dropped: %s", name, why)
    shape = _shape(model, key_size)
    unit = next((str(check.get("unit")) for check in checks.values()), "image")
    record = {
        "min_agreement": threshold(min_agreement, unit),
        "candidates": checks,
        "dropped": dropped,
    }
    if not passing:
        cache.record_choice("int8", shape, {**record, "chosen": None})
        raise none_passes("int8", checks, min_agreement)
    if len(passing) == 1:
        choice = passing[0]
    else:
        name = getattr(model, "model_name", type(model).__name__)
        shape_class = f"{name}-{h}x{w}-b{routes.bucket(batch_size)}-int8"
        example = torch.randn(batch_size, getattr(model, "in_chans", 3), h, w)
        with torch.no_grad():
            timed = {name: (lambda name=name: runner_of(name)(example)) for name in passing}
            choice = routes.choose("backend", shape_class, timed, min_rounds=5)
    runner = runner_of(choice)
    runner.choice = {**record, "chosen": choice}
    cache.record_choice("int8", shape, runner.choice)
    return runner, choice


def _weigh(
    model: nn.Module,
    decision: Any,
    names: list[str],
    precision: str,
    size: tuple[int, int] | None,
    calibration: Any,
    batches: int | None,
) -> str:
    """The measured choice, unless another candidate's total (one-off cost + the announced batches at
    its measured speed) is smaller: a cheap-to-start backend wins a short run."""
    times = {name: ms for name, ms in decision.times_ms.items() if name in names}
    if batches is None or not times or decision.choice not in times:
        return decision.choice
    totals = {
        name: _one_off_s(model, name, precision, size, calibration) + batches * ms / 1e3
        for name, ms in times.items()
    }
    best = min(totals, key=totals.__getitem__)
    if best != decision.choice:
        logger.debug("backend %s instead of %s for %d batches (%s)", best, decision.choice, batches, totals)
    return best


# what ``export_deployable`` writes: format -> precisions (OpenVINO IR carries bf16 as a run-time hint)
EXPORT_PRECISIONS = {"onnx": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8"), "torchscript": ("fp32",)}
FAST_RUNTIME = {
    ("onnx", "fp32"): "onnxruntime and OpenVINO run it",
    ("onnx", "int8"): "OpenVINO runs this QDQ file fast (int8 kernels); onnxruntime runs it, on the CPUs "
    "measured slower than its fp32 graph",
    ("openvino", "fp32"): "OpenVINO runs it (INFERENCE_PRECISION_HINT=f32 keeps it fp32)",
    ("openvino", "bf16"): "OpenVINO runs it in bf16 with INFERENCE_PRECISION_HINT=bf16",
    ("openvino", "int8"): "OpenVINO runs it (int8 kernels where the CPU has VNNI or AMX)",
    ("torchscript", "fp32"): "torch.jit.load runs it",
}


def export_deployable(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "onnx",
    precision: str = "fp32",
    img_size: tuple[int, int] = (224, 224),
    dynamic_batch: bool = True,
    fold: bool = True,
    calibration: Any = None,
) -> Any:
    """Write the file a user ships, checked like the backends check it: ONNX (fp32, or int8 QDQ from
    onnxruntime's quantizer), OpenVINO IR (``path`` is the .xml, the .bin goes beside it; fp32, bf16 or
    NNCF int8) or TorchScript. Returns an ``onnx_export.ExportReport``."""
    from metaformer.deploy.onnx_export import FORMATS, ExportReport, export_model
    from metaformer.deploy.quantize import as_calibration, require_calibration
    from metaformer.weights.io import atomic_write

    check_choice("export format", format, (*FORMATS, "openvino"))
    check_choice("precision", precision, PRECISIONS)
    if precision not in EXPORT_PRECISIONS[format]:
        raise ConfigError(
            f"--format {format} holds {' or '.join(EXPORT_PRECISIONS[format])}, not {precision}; "
            f"use --format {'openvino' if precision == 'bf16' else 'onnx or openvino'}"
        )
    size = (int(img_size[0]), int(img_size[1]))
    if format == "torchscript" or (format == "onnx" and precision == "fp32"):
        return export_model(model, path, format=format, img_size=size, dynamic_batch=dynamic_batch, fold=fold)
    backend = "onnxruntime" if format == "onnx" else "openvino"
    module = backend_module(backend)
    module.check(precision)
    calibration = as_calibration(calibration)
    if precision == "int8":
        require_calibration(calibration)
    path = Path(path)
    start = time.perf_counter()
    example = torch.zeros(1, getattr(model, "in_chans", 3), *size)
    with tempfile.TemporaryDirectory(prefix="metaformer-export-") as tmp:
        runner = module.build(
            model.eval().cpu().float(), precision, example, calibration=calibration, folder=Path(tmp)
        )
        artefact = Path(tmp) / module.ARTEFACT[precision]
        pairs = [(artefact, path)]
        if format == "openvino":
            pairs.append((artefact.with_suffix(".bin"), path.with_suffix(".bin")))
        for source, target in reversed(pairs):  # the .xml last: it names a .bin that is already there
            with atomic_write(target) as out:
                shutil.copyfile(source, out)
    check = runner.check
    diff, batches = float(check.get("max_abs_diff", float("nan"))), tuple(check.get("batches", ()))
    return ExportReport(
        path, format, size, True, diff, batches, time.perf_counter() - start, precision,
        check.get("agreement"), int(check.get("images", 0)),
    )  # fmt: skip


__all__ = [
    "BACKENDS",
    "EXPORT_PRECISIONS",
    "FAST_RUNTIME",
    "export_deployable",
    "PRECISIONS",
    "backend_module",
    "build",
    "candidates",
    "prepare_for_inference",
]

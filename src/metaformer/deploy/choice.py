"""Choosing where a model runs: ``prepare_for_inference`` (the backend named, or ``auto``'s measured
choice), with int8's trust rule (``agreement``): the fastest candidate whose held-out agreement with
fp32 meets the threshold."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metaformer.deploy import backends, building
from metaformer.deploy.backends import BACKENDS, PRECISIONS
from metaformer.errors import ConfigError, ExportError, check_choice

logger = logging.getLogger(__name__)

SMALL_WORK_BATCHES = 4  # work this small is not worth probing every backend (that builds each artefact)
# the most of the torch fast path's time a compiled graph saves (assumed, generously: the issue's
# PoolFormer-S12 figures put Inductor within 10% of the eager fast path); compile joins auto only when
# its estimated compile costs less than this share of the announced work on the fast path
COMPILE_SAVING = 0.3


@dataclass(frozen=True)
class DeployRequest:
    """What a caller asks of the deployment layer, normalised and checked once: the backend (or auto) and
    precision, the image size, batch size and thread count, the calibration set (a ``Calibration``),
    int8's agreement threshold, how many images will run (None: many), whether artefacts are cached, and
    whether one runner takes every image size."""

    backend: str = "auto"
    precision: str = "fp32"
    img_size: tuple[int, int] = (224, 224)
    batch_size: int = 32
    threads: int | None = None
    calibration: Any = None
    min_agreement: float | None = None
    images: int | None = None
    use_cache: bool = True
    dynamic_size: bool = False

    def __post_init__(self) -> None:
        from metaformer.deploy.quantize import as_calibration

        check_choice("backend", self.backend, BACKENDS)
        check_choice("precision", self.precision, PRECISIONS)
        object.__setattr__(self, "img_size", (int(self.img_size[0]), int(self.img_size[1])))
        object.__setattr__(self, "calibration", as_calibration(self.calibration))
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise ConfigError(
                f"min_agreement is a fraction from 0 to 1, such as 0.99, not {self.min_agreement}"
            )

    def check_calibration(self) -> None:
        """The one place "int8 needs calibration" is said (``quantize.require_calibration``)."""
        if self.precision == "int8":
            from metaformer.deploy.quantize import require_calibration

            require_calibration(self.calibration)

    def build(self, model: nn.Module, backend: str, *, for_images: bool = True) -> nn.Module:
        """``backend``'s runner (``building.build``); ``for_images=False``: built to be measured, not
        for the announced images."""
        return building.build(
            model, backend, self.precision, img_size=self.img_size, batch_size=self.batch_size,
            threads=self.threads, calibration=self.calibration, use_cache=self.use_cache,
            images=self.images if for_images else None, dynamic_size=self.dynamic_size,
        )  # fmt: skip

    def shape_class(self, model: nn.Module) -> str:
        """The route key auto's decision is cached under: model, size, batch bucket, precision."""
        from metaformer.models import routes

        h, w = self.img_size
        name = getattr(model, "model_name", type(model).__name__)
        shape = f"{name}-{h}x{w}-b{routes.bucket(self.batch_size)}"
        return shape if self.precision == "fp32" else f"{shape}-{self.precision}"

    @property
    def batches(self) -> int | None:
        return None if self.images is None else max(1, math.ceil(self.images / self.batch_size))

    @property
    def key_size(self) -> tuple[int, int] | None:
        """The size an artefact is cached under (None: a graph for every size)."""
        return None if self.dynamic_size else self.img_size


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
    ``openvino`` run the exported graph on the CPU; ``compile`` the fast path compiled by Inductor
    (``backend_compile``); ``auto`` measures them, compile only when the work pays for compiling.
    ``images``: how many images the caller will run (None: many), which decides whether a backend's
    one-off cost pays off.
    ``threads``: the runtimes' threads (default: PyTorch's). ``dynamic_size``: images of every size
    go through one runner (a segmenter's; ``img_size`` is a typical one, where auto measures).
    ``min_agreement``: the top-1 agreement with fp32 an int8 model needs on the calibration source's
    held-out images (None: 0.99 per image, 0.98 per pixel; ``agreement``): auto drops a candidate below
    it, a named backend runs after one warning sentence. The runner's ``choice`` records the candidates
    measured and those dropped, and why.
    """
    request = DeployRequest(
        backend, precision, img_size, batch_size, threads, calibration, min_agreement, images, use_cache,
        dynamic_size,
    )  # fmt: skip
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
    if backend != "auto":
        runner = request.build(model, backend)
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
    names = backends.candidates(precision) if foldable(model) else (["torch"] if precision != "int8" else [])
    if not names:
        raise ConfigError(
            f"no installed backend runs {precision} here; pip install 'metaformer[openvino]' "
            "or use --precision fp32"
        )
    request.check_calibration()
    if precision == "int8":
        return _auto_int8(model, names, request)
    if foldable(model):
        names = with_compile(model, names, request)
    if len(names) == 1:
        return request.build(model, names[0]), names[0]
    return _auto(model, names, request)


def _auto(model: nn.Module, names: list[str], request: DeployRequest) -> tuple[nn.Module, str]:
    """The backend measured fastest on the real batch (cached per machine), weighed against each one's
    one-off cost for the images announced."""
    from metaformer.models import routes

    precision, key_size, batches = request.precision, request.key_size, request.batches
    shape_class = request.shape_class(model)
    decision = routes.known_decision("backend", shape_class, names)
    if decision is not None and set(decision.times_ms) & set(names):
        choice = _weigh(model, decision, names, request)
        return request.build(model, choice), choice
    if batches is not None and batches <= SMALL_WORK_BATCHES:
        # measuring builds every backend's artefact: a short run takes one that needs none or is built
        ready = [
            name for name in names
            if not backends.backend(name).caches_files
            or building.cached_entry(model, name, precision, key_size, request.calibration)
        ]  # fmt: skip
        choice = (ready or names)[0]
        return request.build(model, choice), choice
    runners: dict[str, nn.Module] = {}
    for name in names:
        try:
            runners[name] = request.build(model, name, for_images=False)
        except ExportError as error:  # its outputs were wrong: it is not a candidate
            logger.warning("%s backend skipped: %s", name, error)
    if not runners:
        raise ExportError(f"no backend could run {precision} with outputs matching PyTorch")
    h, w = request.img_size
    example = torch.randn(request.batch_size, getattr(model, "in_chans", 3), h, w)
    with torch.no_grad():
        for runner in runners.values():
            runner(example)  # first calls (the fast path's own route probes) are not part of its time
        timed = {name: (lambda runner=runner: runner(example)) for name, runner in runners.items()}
        choice = routes.choose("backend", shape_class, timed, min_rounds=5)
    return runners[choice], choice


def _auto_int8(model: nn.Module, names: list[str], request: DeployRequest) -> tuple[nn.Module, str]:
    """The fastest int8 candidate whose held-out agreement with fp32 meets the threshold. A cached
    artefact's agreement is read from its cache entry (nothing is loaded); the others are built (and
    cached with theirs). A short run stops at the first candidate that passes, cached ones first."""
    from metaformer.deploy import cache
    from metaformer.deploy.agreement import none_passes, passes, threshold, why_dropped
    from metaformer.models import routes

    key_size, batches, min_agreement = request.key_size, request.batches, request.min_agreement
    h, w = request.img_size
    cached = {
        name: entry.meta["check"]
        for name in names
        if request.use_cache
        and (entry := building.cached_entry(model, name, "int8", key_size, request.calibration)) is not None
        and isinstance(entry.meta.get("check"), dict)
        and "unit" in entry.meta["check"]
    }
    short = batches is not None and batches <= SMALL_WORK_BATCHES
    order = sorted(names, key=lambda name: name not in cached) if short else names
    checks: dict[str, dict[str, Any]] = {}
    runners: dict[str, nn.Module] = {}

    def runner_of(name: str) -> nn.Module:
        if name not in runners:
            runners[name] = request.build(model, name)
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
    shape = building.shape_name(model, key_size)
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
        example = torch.randn(request.batch_size, getattr(model, "in_chans", 3), h, w)
        with torch.no_grad():
            timed = {name: (lambda name=name: runner_of(name)(example)) for name in passing}
            choice = routes.choose("backend", request.shape_class(model), timed, min_rounds=5)
    runner = runner_of(choice)
    runner.choice = {**record, "chosen": choice}
    cache.record_choice("int8", shape, runner.choice)
    return runner, choice


def with_compile(model: nn.Module, names: list[str], request: DeployRequest) -> list[str]:
    """``names`` and, when its compile pays for itself, the compile backend: its estimated compile
    (``building.compile_cost_s``, no compiling to find out) costs at most ``COMPILE_SAVING`` of the
    announced batches' time on the torch fast path (measured or recorded). With no work announced,
    only a compile Inductor's caches already hold joins. Never for ``dynamic_size`` (a segmenter's
    images of every size): an image size that changes the graph's shape arithmetic compiles again
    (about a minute for a tiny segmenter here), which no estimate made before the images can know."""
    if request.dynamic_size or "torch" not in names or not backends.runnable("compile", request.precision):
        return names
    cost, warm = building.compile_cost_s(model, request.precision, request.key_size, request.batch_size)
    batches = request.batches
    if batches is None:
        payable = warm
    elif batches <= SMALL_WORK_BATCHES:
        payable = False  # a compile, even from warm caches, costs more than a few batches save
    else:
        payable = cost <= COMPILE_SAVING * batches * _torch_batch_s(model, request)
    logger.debug("compile %s auto: about %.1f s to compile (%s)", "joins" if payable else "stays out of",
                 cost, "warm caches" if warm else "cold")  # fmt: skip
    return [*names, "compile"] if payable else names


def _torch_batch_s(model: nn.Module, request: DeployRequest) -> float:
    """Seconds per batch on the torch fast path: auto's recorded measurement, else one timed batch."""
    from metaformer.models import routes

    decision = routes.known_decision("backend", request.shape_class(model), ["torch"])
    if decision is not None and "torch" in decision.times_ms:
        return decision.times_ms["torch"] / 1e3
    runner = request.build(model, "torch", for_images=False)
    h, w = request.img_size
    example = torch.randn(request.batch_size, getattr(model, "in_chans", 3), h, w)
    with torch.no_grad():
        runner(example)
        start = time.perf_counter()
        runner(example)
    return time.perf_counter() - start


def _weigh(model: nn.Module, decision: Any, names: list[str], request: DeployRequest) -> str:
    """The measured choice, unless another candidate's total (one-off cost + the announced batches at
    its measured speed) is smaller: a cheap-to-start backend wins a short run."""
    times = {name: ms for name, ms in decision.times_ms.items() if name in names}
    batches = request.batches
    if batches is None:
        return decision.choice if decision.choice in times else min(times, key=times.__getitem__)
    totals = {
        name: building.one_off_s(
            model, name, request.precision, request.key_size, request.calibration, request.batch_size
        )
        + batches * ms / 1e3
        for name, ms in times.items()
    }
    best = min(totals, key=totals.__getitem__)
    if best != decision.choice:
        logger.debug("backend %s instead of %s for %d batches (%s)", best, decision.choice, batches, totals)
    return best


__all__ = ["COMPILE_SAVING", "SMALL_WORK_BATCHES", "DeployRequest", "prepare_for_inference", "with_compile"]

"""Either/or choices in the fast and training paths, decided by measuring both on the real shapes.

Which of two equal computations is faster (the native kernel or torch ops, GEMMs or 1x1 convolutions,
oneDNN's fused linear or the plain one) depends on the CPU, its thread count and the shapes: the
native kernel that wins on one server loses on an AVX2 laptop. So nothing here is decided from the
machine the code was written on. At the first call with a new shape class, ``choose`` runs every
candidate a few times, interleaved (about a quarter of a second in all), keeps the fastest and
caches the choice in memory and in ``$METAFORMER_HOME/routes`` (keyed by CPU signature and torch
version, like the kernel build cache), so later runs start with it. A candidate that raises (a
primitive this CPU lacks) is dropped.

On a shared machine other processes only ever add time, in bursts, so a candidate's figure is its
fastest round, not its median: a burst that lands on one candidate's rounds cannot flip the choice.
A close call (the runner-up within ``CLOSE`` of the winner) read from the cache is measured once more
in each of the next few processes (``RECHECKS`` probes in all), keeping every candidate's fastest
time over all of them, so a choice that one unlucky probe got wrong does not stay wrong.

``METAFORMER_ROUTE_<NAME>=<choice>`` forces a choice; ``METAFORMER_ROUTE_PROBE=0`` skips measuring
and takes each route's first (portable) candidate.
Random number generators are restored after a probe, so a seeded run draws the same numbers whether
or not it measured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaformer.errors import ConfigError
from metaformer.models.hardware import cpu_profile

logger = logging.getLogger(__name__)

# route name -> every choice it may take, the portable (always available) one first
ROUTES: dict[str, tuple[str, ...]] = {
    "train_pool_mix": ("torch", "native"),
    "train_mlp": ("conv", "gemm", "fused", "fp32"),
    "fast_pool_mix": ("torch", "native"),
    "fast_mlp": ("gemm", "onednn", "conv", "native"),
    "fast_chunk": ("whole", "chunked"),
    "backend": ("torch", "onnxruntime", "openvino"),
}
ROUTE_HELP = {
    "train_pool_mix": "training pooling half: native C kernel or torch ops",
    "train_mlp": "training channel MLP: 1x1 convs, GEMMs on channels-last rows (plain, or with fc1's bias "
    "and GELU fused natively), or fp32 under autocast",
    "fast_pool_mix": "inference pooling half and second norm: native C kernel or torch ops",
    "fast_mlp": "inference channel MLP: plain GEMMs, oneDNN fused GEMMs, 1x1 convolutions, or GEMMs with "
    "fc1's bias and GELU in one native pass",
    "fast_chunk": "inference stages: whole batch, or a few samples at a time (cache-sized)",
    "backend": "eval/predict runtime: PyTorch fast path, or onnxruntime or OpenVINO on the exported graph",
}

PROBE_SECONDS = 0.25  # per decision, after the warm-up call of each candidate
MIN_ROUNDS, MAX_ROUNDS = 3, 9
CLOSE = 0.15  # a runner-up this close (relative) to the winner makes a cached choice worth re-checking
RECHECKS = 3  # probes in all (over separate processes) that a close call gets


@dataclass
class Decision:
    route: str
    shape_class: str
    choice: str
    times_ms: dict[str, float] = field(default_factory=dict)  # fastest round per candidate, if measured
    source: str = "probe"  # probe | cache | env | default
    probes: int = 1  # measurements merged into times_ms (one per process at most)


_DECISIONS: dict[tuple[str, str], Decision] = {}


_PROBES_OFF: ContextVar[bool] = ContextVar("metaformer_route_probes_off", default=False)


@contextlib.contextmanager
def probes_off() -> Iterator[None]:
    """Within it, every route takes its first candidate without measuring or caching anything: for code
    that runs a model to observe it, such as an op counter, which would count a probe's timing runs."""
    token = _PROBES_OFF.set(True)
    try:
        yield
    finally:
        _PROBES_OFF.reset(token)


def _probing_disabled() -> bool:
    return _PROBES_OFF.get() or os.environ.get("METAFORMER_ROUTE_PROBE") == "0"


_DISK: dict[str, Any] | None = None


def bucket(n: int) -> int:
    """The power of two at or above ``n``: shape classes that share a choice."""
    return 1 << max(0, int(n) - 1).bit_length()


def _cache_file() -> Path:
    home = os.environ.get("METAFORMER_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "metaformer"
    version = torch.__version__.split("+")[0]
    return root / "routes" / f"{cpu_profile().signature}-torch{version}.json"


def _disk() -> dict[str, Any]:
    global _DISK
    if _DISK is None:
        try:
            _DISK = json.loads(_cache_file().read_text())
            if not isinstance(_DISK, dict):
                _DISK = {}
        except (OSError, ValueError):
            _DISK = {}
    return _DISK


def _save(decision: Decision, candidates: Sequence[str]) -> None:
    """Best effort and atomic: a read-only or full cache folder only costs a probe next run."""
    disk = _disk()
    disk[f"{decision.route}|{decision.shape_class}"] = {
        "choice": decision.choice,
        "times_ms": decision.times_ms,
        "candidates": list(candidates),  # those that raised have no time
        "probes": decision.probes,
    }
    try:
        write_json_atomic(_cache_file(), disk)
    except OSError as error:
        logger.debug("route cache not written (%s)", error)


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, written beside it and renamed, so a reader never sees half a file
    (the route cache and the deployment cache's cost file both use it). Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _override(route: str) -> str | None:
    value = os.environ.get(f"METAFORMER_ROUTE_{route.upper()}")
    if not value:
        return None
    if value not in ROUTES[route]:
        raise ConfigError(
            f"METAFORMER_ROUTE_{route.upper()}={value} is not a choice of that route; "
            f"use one of {', '.join(ROUTES[route])} or unset it"
        )
    return value


def _measure(candidates: Mapping[str, Callable[[], Any]], min_rounds: int = MIN_ROUNDS) -> dict[str, float]:
    """Milliseconds of each candidate's fastest round; a candidate that raises is left out."""
    alive: dict[str, Callable[[], Any]] = {}
    for name, run in candidates.items():
        try:
            run()  # warm-up: allocations, oneDNN primitive creation, first-touch pages, nested probes
            alive[name] = run
        except RuntimeError as error:
            logger.debug("route candidate %s failed (%s); left out", name, error)
    times: dict[str, list[float]] = {name: [] for name in alive}
    start = time.perf_counter()
    for round_ in range(max(MAX_ROUNDS, min_rounds)):
        order = list(alive.items())
        if round_ % 2:
            order.reverse()
        for name, run in order:
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
        if round_ + 1 >= min_rounds and time.perf_counter() - start > PROBE_SECONDS:
            break
    return {name: round(min(ts) * 1e3, 4) for name, ts in times.items()}


def step_probe(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor] = ()
) -> Callable[[], None]:
    """A candidate for ``choose`` that runs ``forward`` once on a detached copy of ``x`` and, when grad
    is on, its backward for the input and ``params`` too (the training step's real work), through
    ``torch.autograd.grad``, so no parameter's ``.grad`` is touched."""
    grad = torch.is_grad_enabled()

    def once() -> None:
        probe = x.detach().requires_grad_(grad)
        y = forward(probe)
        if grad:
            wanted = [probe, *(p for p in params if p.requires_grad)]
            torch.autograd.grad(y, wanted, torch.ones_like(y))

    return once


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def known(route: str, shape_class: str) -> str | None:
    """The choice already made for ``route`` here (forced, decided in this process, or cached), or None:
    lets a caller skip building a costly candidate (an ONNX export) when the answer is known."""
    forced = _override(route)
    if forced is not None:
        return forced
    if os.environ.get("METAFORMER_ROUTE_PROBE") == "0":
        return ROUTES[route][0]
    shape_class = f"{shape_class}-t{torch.get_num_threads()}"
    decided = _DECISIONS.get((route, shape_class))
    if decided is not None:
        return decided.choice
    cached = _disk().get(f"{route}|{shape_class}")
    return cached.get("choice") if isinstance(cached, dict) else None


def known_decision(route: str, shape_class: str, candidates: Sequence[str]) -> Decision | None:
    """The decision already made for ``route`` here, measured against every one of ``candidates``
    (its times tell a caller what the choice saves), or None: a decision that never timed one of
    them (a newly installed runtime) does not stand. A forced choice has no times."""
    forced = _override(route)
    if forced is not None:
        return Decision(route, shape_class, forced, {}, "env")
    shape_class = f"{shape_class}-t{torch.get_num_threads()}"
    decided = _DECISIONS.get((route, shape_class))
    if decided is None:
        cached = _disk().get(f"{route}|{shape_class}")
        if not isinstance(cached, dict) or not isinstance(cached.get("times_ms"), dict):
            return None
        if not set(candidates) <= set(cached.get("candidates", cached["times_ms"])):
            return None
        decided = _cached_decision(route, shape_class, cached)
    return decided


def choose(
    route: str, shape_class: str, candidates: Mapping[str, Callable[[], Any]], *, min_rounds: int = MIN_ROUNDS
) -> str:
    """The choice for ``route`` at ``shape_class`` among ``candidates`` (choice -> a call that runs it
    once on the real shapes). The first candidate is the fallback when nothing else can run.
    ``min_rounds``: more timed rounds for a choice that is costly to get wrong (the whole backend)."""
    names = list(candidates)
    forced = _override(route)
    if forced is not None and forced in candidates:
        return forced
    if len(names) == 1 or _probing_disabled():
        return names[0]
    shape_class = f"{shape_class}-t{torch.get_num_threads()}"
    key = (route, shape_class)
    known = _DECISIONS.get(key)
    cached = _disk().get(f"{route}|{shape_class}")
    earlier: Decision | None = None  # a close cached call, measured again below and merged
    if known is None and isinstance(cached, dict) and isinstance(cached.get("times_ms"), dict):
        # a cached choice stands only if it was measured against every candidate there is now (a newer
        # version may bring a route the cache has never timed)
        if set(names) <= set(cached.get("candidates", cached["times_ms"])):
            known = _cached_decision(route, shape_class, cached)
            # re-checked only on the full set: a narrower one (a kernel switched off) must not
            # overwrite the decision made with every candidate
            full_set = set(known.times_ms) <= set(names)
            if full_set and known.probes < RECHECKS and _close(known.times_ms, names):
                earlier, known = known, None
            else:
                _DECISIONS[key] = known
    if known is not None:
        if known.choice in candidates:
            return known.choice
        # fewer candidates than measured (a kernel switched off for a block of code): the fastest of
        # them as measured, leaving the decision for the full set as it is
        timed = {name: ms for name, ms in known.times_ms.items() if name in candidates}
        if timed:
            return min(timed, key=timed.__getitem__)
    # fork_rng: the probe's random draws (stochastic depth) leave the run's stream as it was; plain
    # saved-tensor hooks: inside activation checkpointing the probe's graph is not the checkpoint's
    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        times = _measure(candidates, min_rounds)
    probes = 1
    if earlier is not None:  # every candidate's fastest time over all probes (one that now raises is out)
        times = {name: min(ms, earlier.times_ms.get(name, ms)) for name, ms in times.items()}
        probes = earlier.probes + 1
    choice = min(times, key=times.__getitem__) if times else names[0]
    decision = Decision(route, shape_class, choice, times, probes=probes)
    _DECISIONS[key] = decision
    _save(decision, names)
    logger.debug("route %s [%s]: %s (%s ms)", route, shape_class, choice, times)
    return choice


def _cached_decision(route: str, shape_class: str, value: Mapping[str, Any]) -> Decision:
    """A decision as the cache file holds it (files written before ``probes`` existed count one)."""
    probes = value.get("probes", 1)
    times = value.get("times_ms")
    return Decision(
        route,
        shape_class,
        str(value.get("choice")),
        dict(times) if isinstance(times, dict) else {},
        "cache",
        probes if isinstance(probes, int) and probes > 0 else 1,
    )


def _close(times_ms: Mapping[str, float], names: Sequence[str]) -> bool:
    """Whether the two fastest of ``names`` are within ``CLOSE`` of each other."""
    timed = sorted(ms for name, ms in times_ms.items() if name in names and isinstance(ms, (int, float)))
    return len(timed) >= 2 and timed[1] <= timed[0] * (1 + CLOSE)


def decisions(*, include_cached: bool = True) -> list[Decision]:
    """Every choice this process made, then (optionally) the ones cached on disk for this machine."""
    found = {(d.route, d.shape_class): d for d in _DECISIONS.values()}
    if include_cached:
        for key, value in _disk().items():
            route, _, shape_class = key.partition("|")
            if (route, shape_class) not in found and isinstance(value, dict):
                found[route, shape_class] = _cached_decision(route, shape_class, value)
    for route in ROUTES:
        forced = os.environ.get(f"METAFORMER_ROUTE_{route.upper()}")
        if forced:
            found[route, "*"] = Decision(route, "*", forced, {}, "env")
    return sorted(found.values(), key=lambda d: (list(ROUTES).index(d.route), d.shape_class))


def reset(*, disk: bool = False) -> None:
    """Forget this process's choices (tests; after changing threads); ``disk=True`` also the cache file."""
    global _DISK
    _DECISIONS.clear()
    _DISK = None
    if disk:
        try:
            _cache_file().unlink()
        except OSError:
            pass


def as_records() -> list[dict[str, Any]]:
    return [asdict(d) for d in decisions()]

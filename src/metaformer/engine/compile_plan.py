"""Whether a training run compiles its model: ``--compile auto`` weighs the measured saving against the
compile time, and a small per-machine record remembers what compiling cost and gained here.

The expected saving is (announced steps) x (eager step seconds, measured on the run's first steps) x
(the speed-up fraction compiling gave this key before, or ``ASSUMED_SPEEDUP``); it is weighed against
the compile time this key took before (warm: its Inductor cache and artefacts are there), or
``ASSUMED_COLD_COMPILE_S`` scaled by the model's depth. The record, ``<metaformer home>/compile/
training.json``, is keyed by model class and parameter shapes, input shape (batch and image size),
device type, autocast dtype, layout, checkpointing and torch version; every compiled run updates it.

``CompileSwitch`` is what the loop holds: it runs the first ``EAGER_PROBE_STEPS`` steps eager (the same
math), decides, then hands out the compiled module and times its first steps for the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metaformer.compiling import COMPILE_CHOICES, artifacts_path, compile_module
from metaformer.errors import check_choice
from metaformer.weights.download import cache_dir as metaformer_home
from metaformer.weights.io import atomic_write

logger = logging.getLogger(__name__)

# A cold Inductor compile of a PoolFormer-S12 training step (forward and backward, 224 px, batch 16)
# took 178-187 s on a 2-core AMD EPYC (AVX2), 10 s with a warm cache: the measurement that opened the
# work on compiled training. Deeper models compile for longer: scaled by blocks / 12, at least half.
ASSUMED_COLD_COMPILE_S = 180.0
ASSUMED_WARM_COMPILE_S = 10.0
REFERENCE_BLOCKS = 12
# The same measurement's step speed-up by hand: ours eager 6.83-7.45 img/s, compiled 8.20 (10-20%);
# the lower end, for any device, until this machine's record says better.
ASSUMED_SPEEDUP = 0.10
EAGER_PROBE_STEPS = 4  # the first is warm-up; the median of the rest is the eager step time
COMPILED_PROBE_STEPS = 4  # after the compiling step: the median is the compiled step time
RECORD_FILE = Path("compile") / "training.json"
BACKEND = "inductor"  # tests set aot_eager: the same tracing and autograd, without a C++ build


@dataclass(frozen=True)
class CompileRecord:
    """What compiling one key cost and gained on this machine (seconds; None: not measured yet)."""

    cold_compile_s: float | None = None
    warm_compile_s: float | None = None
    eager_step_s: float | None = None
    compiled_step_s: float | None = None

    @property
    def speedup(self) -> float | None:
        """The fraction of an eager step compiling saved (negative: compiled was slower)."""
        if not self.eager_step_s or self.compiled_step_s is None:
            return None
        return 1.0 - self.compiled_step_s / self.eager_step_s


@dataclass(frozen=True)
class CompileDecision:
    requested: str
    used: bool
    reason: str
    expected_compile_s: float | None = None
    expected_saving_s: float | None = None

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def assumed_compile_seconds(blocks: int | None) -> float:
    """The cold compile time assumed without a record: the S12 measurement scaled by depth."""
    scale = 1.0 if blocks is None else max(0.5, blocks / REFERENCE_BLOCKS)
    return ASSUMED_COLD_COMPILE_S * scale


def decide(
    requested: str,
    *,
    steps: int,
    eager_step_s: float,
    record: CompileRecord | None = None,
    cache_warm: bool = False,
    blocks: int | None = None,
) -> CompileDecision:
    """Compile or not: ``on``/``off`` as asked; ``auto`` when ``steps`` x ``eager_step_s`` x the speed-up
    (the record's, else ``ASSUMED_SPEEDUP``) exceeds the expected compile time (the record's warm or
    cold time, else the assumption; ``cache_warm``: this key's caches are on disk)."""
    check_choice("compile", requested, COMPILE_CHOICES)
    if requested != "auto":
        return CompileDecision(requested, requested == "on", f"--compile {requested}")
    record = record or CompileRecord()
    measured = record.speedup
    speedup = measured if measured is not None else ASSUMED_SPEEDUP
    if cache_warm:
        compile_s = record.warm_compile_s or ASSUMED_WARM_COMPILE_S
        source = "warm cache"
    elif record.cold_compile_s is not None:
        compile_s, source = record.cold_compile_s, "cold, measured here"
    else:
        compile_s, source = assumed_compile_seconds(blocks), "cold, assumed"
    saving = steps * eager_step_s * speedup
    used = saving > compile_s
    gain = f"{speedup:.0%} {'measured' if measured is not None else 'assumed'}"
    reason = (
        f"auto: {steps} steps x {eager_step_s * 1000:.3g} ms x {gain} speed-up saves {saving:.0f} s "
        f"{'>' if used else '<='} {compile_s:.0f} s to compile ({source})"
    )
    return CompileDecision("auto", used, reason, compile_s, saving)


def record_key(model: nn.Module, batch: Any, device: torch.device, dtype: torch.dtype | None) -> str:
    """The record's and the cache artefacts' key: model class and parameter shapes, input shape,
    device type, autocast dtype, layout, gradient checkpointing and torch version."""
    shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    config = hashlib.sha256(shapes.encode()).hexdigest()[:12]
    first = _first_tensor(batch)
    size = "x".join(str(s) for s in first.shape) if first is not None else "none"
    layout = "cl" if first is not None and first.ndim == 4 and _is_channels_last(first) else "nchw"
    checkpointing = any(getattr(m, "grad_checkpointing", False) for m in model.modules())
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else "fp32"
    return "-".join(
        [
            type(model).__name__,
            config,
            size,
            device.type,
            dtype_name,
            layout,
            "ckpt" if checkpointing else "nockpt",
            f"torch{torch.__version__.split('+')[0]}",
        ]
    )


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _record_path(home: Path | None) -> Path:
    return Path(home if home is not None else metaformer_home()) / RECORD_FILE


def read_records(home: Path | None = None) -> dict[str, CompileRecord]:
    """This machine's records; an unreadable file counts as none (it is rewritten by the next run)."""
    path = _record_path(home)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        fields = CompileRecord.__dataclass_fields__
        return {
            key: CompileRecord(**{k: v for k, v in value.items() if k in fields})
            for key, value in raw.items()
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def write_record(key: str, record: CompileRecord, home: Path | None = None) -> None:
    """Merge ``record`` into this machine's records (measured values replace older ones)."""
    records = read_records(home)
    old = asdict(records.get(key, CompileRecord()))
    old.update({k: v for k, v in asdict(record).items() if v is not None})
    records[key] = CompileRecord(**old)
    path = _record_path(home)
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({k: asdict(v) for k, v in records.items()}, indent=2) + "\n")
    except Exception as err:  # the record only tunes the next auto decision
        logger.info("could not write the compile record %s (%s)", path, err)


def cache_is_warm(key: str, home: Path | None = None) -> bool:
    """This key's portable cache artefacts are on disk (saved after its last compiled run)."""
    return artifacts_path(key, home).is_file()


class CompileSwitch:
    """What a training loop steps: with ``auto`` its first steps run eager and are timed, then it decides;
    ``on`` compiles from the first step, ``off`` never.

    ``model``: what the loop steps (the DDP wrapper where there is one: compiled after wrapping, as timm
    does); ``eager_module``: the bare model (key, depth). ``steps``: the steps this run announces (epochs
    left x batches per epoch). ``decision`` is None while ``auto`` probes.
    """

    def __init__(
        self,
        requested: str,
        model: nn.Module,
        *,
        steps: int,
        device: torch.device,
        dtype: torch.dtype | None,
        eager_module: nn.Module,
        home: Path | None = None,
    ) -> None:
        check_choice("compile", requested, COMPILE_CHOICES)
        self.requested, self.model, self.steps = requested, model, steps
        self.device, self.dtype, self.home = device, dtype, home
        self.eager_module = eager_module
        self.decision: CompileDecision | None = None
        self.compiled: Any = None
        self.key: str | None = None
        self.eager_times: list[float] = []
        self.compiled_times: list[float] = []
        self._recorded = False
        if requested != "auto":
            self.decision = decide(requested, steps=steps, eager_step_s=0.0)
            logger.info("compile: %s (%s)", requested, self.decision.reason)

    def module_for_step(self, batch: Any) -> nn.Module:
        """The module the next step runs: eager while probing or when off, else the compiled one."""
        if self.requested == "off":
            return self.model
        if self.key is None:
            self.key = record_key(self.eager_module, batch, self.device, self.dtype)
        if self.decision is None and len(self.eager_times) >= EAGER_PROBE_STEPS:
            self._decide()
        if self.decision is not None and self.decision.used and self.compiled is None:
            self.compiled = compile_module(
                self.model, key=self.key, dynamic=None, backend=BACKEND, home=self.home
            )
        if self.compiled is not None and self.compiled.compiled:
            return self.compiled
        return self.model

    @property
    def timing(self) -> bool:
        """Whether the next step's time is still wanted (the loop then synchronises the device)."""
        return self.requested != "off" and not self._recorded

    def first_compiled_steps(self, module: nn.Module) -> bool:
        """``module`` is the compiled one and the step that compiles its backward has not finished: an
        error there is a compile failure (the loop then falls back and repeats the step eager)."""
        return module is self.compiled and not self.compiled_times

    def step_done(self, seconds: float) -> None:
        """Record one step's wall time (the loop synchronises the device first)."""
        if self.decision is None:
            self.eager_times.append(seconds)
        elif self.compiled is not None and self.compiled.compiled and not self._recorded:
            self.compiled_times.append(seconds)
            if len(self.compiled_times) > COMPILED_PROBE_STEPS:
                self._write_record()
        elif self.compiled is None or not self.compiled.compiled:
            self._recorded = True  # off after probing, or fell back: nothing more to time

    def eager_step_seconds(self) -> float:
        times = self.eager_times[1:] or self.eager_times
        return statistics.median(times) if times else 0.0

    def _decide(self) -> None:
        assert self.key is not None
        records = read_records(self.home)
        blocks = sum(1 for m in self.eager_module.modules() if type(m).__name__.endswith("Block"))
        self.decision = decide(
            self.requested,
            steps=max(0, self.steps - len(self.eager_times)),
            eager_step_s=self.eager_step_seconds(),
            record=records.get(self.key),
            cache_warm=cache_is_warm(self.key, self.home),
            blocks=blocks or None,
        )
        logger.info("compile: %s (%s)", "on" if self.decision.used else "off", self.decision.reason)

    def compile_seconds(self) -> float | None:
        """What compiling cost this run: the first compiled step's time beyond a compiled step's (the
        forward's compile, and the backward's, which compiles lazily inside that step's backward)."""
        if len(self.compiled_times) < 2:
            return self.compiled.compile_seconds if self.compiled is not None else None
        return max(0.0, self.compiled_times[0] - statistics.median(self.compiled_times[1:]))

    def _write_record(self) -> None:
        self._recorded = True
        assert self.key is not None and self.compiled is not None
        seconds = self.compile_seconds()
        compiled_step = statistics.median(self.compiled_times[1:])  # the first one compiled
        warm = self.compiled.cache_hit
        write_record(
            self.key,
            CompileRecord(
                cold_compile_s=None if warm else seconds,
                warm_compile_s=seconds if warm else None,
                eager_step_s=self.eager_step_seconds() if self.eager_times else None,
                compiled_step_s=compiled_step,
            ),
            self.home,
        )

    def summary(self) -> dict[str, Any]:
        """For config.json and summary.json: the decision and what compiling measured in this run."""
        if self.decision is None:  # the run ended while probing: nothing left to pay a compile back
            out: dict[str, Any] = {
                "requested": self.requested,
                "used": False,
                "reason": f"auto: the run ended within its first {EAGER_PROBE_STEPS} (eager) steps",
            }
        else:
            out = self.decision.as_record()
        if self.compiled is not None:
            out["used"] = self.compiled.compiled
            out["compile_seconds"] = self.compile_seconds()
            out["cache_hit"] = self.compiled.cache_hit
            if self.compiled.failure:
                out["failure"] = self.compiled.failure
        if self.eager_times:
            out["eager_step_s"] = self.eager_step_seconds()
        if len(self.compiled_times) > 1:
            out["compiled_step_s"] = statistics.median(self.compiled_times[1:])
        return out

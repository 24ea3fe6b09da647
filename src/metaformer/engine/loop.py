"""The epoch loop every task uses: AMP, EMA, grad clipping and accumulation, DDP, checkpoints, resume.

A task plugs in through three methods and one attribute, so classification, detection and
segmentation share this loop instead of copying it::

    class MyTask:
        primary_metric = "top1"  # key of evaluate()'s dict that picks the best epoch (higher is better)

        def train_step(self, model, batch) -> tuple[torch.Tensor, int]:
            '''Forward one batch (already on the device) and return (scalar loss, number of samples).'''

        def evaluate(self, model, loader) -> dict[str, float]:
            '''Metrics over the whole loader, already reduced over ranks; a "loss" key becomes val_loss.'''

        def save_weights(self, model, path) -> None:
            '''Write the deployable weights (safetensors with metadata) of the unwrapped model.'''

The loop moves each batch to the device (tensors inside tuples, lists and dicts, so detection's
``(images, [target dicts])`` works), runs ``train_step`` under autocast, scales the loss for
accumulation, steps optimizer, grad scaler, EMA and the timm scheduler (``step_update`` per optimizer
step and ``step`` per epoch, so either kind of timm schedule works), evaluates under ``torch.no_grad``,
and writes the run folder (rank 0 only): metrics.jsonl, last.pt (resume state), last/best weights,
summary.json and curves.png.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from metaformer.compiling import COMPILE_CHOICES, unwrap_compiled
from metaformer.engine import state as run_state
from metaformer.engine.compile_plan import CompileSwitch
from metaformer.engine.distributed import DistInfo, all_reduce_sum, run_on_main
from metaformer.errors import CheckpointError, ConfigError, check_choice, from_worker
from metaformer.models.hardware import native_bf16, warn_emulated_bf16
from metaformer.options import AMP_MODES
from metaformer.weights import load_state, save_state

logger = logging.getLogger(__name__)

COMPILE_DECISION_KEY = "compile_decision"  # in config.json and summary.json: requested, used, why, seconds
PLOT_INTERVAL_S = 60.0  # curves.png is redrawn at most this often during a run, and always at its end


class Task(Protocol):
    """What a task gives the loop (see the module docstring)."""

    primary_metric: str

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]: ...

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]: ...

    def save_weights(self, model: nn.Module, path: Path) -> None: ...


@dataclass(frozen=True)
class RunConfig:
    """How to run the loop (the recipe itself - optimizer, schedule, data - is built by the task).

    ``output_dir=None`` writes nothing. ``stop_after_epoch`` ends the run, resumable, once that epoch is
    done (for clusters with job time limits). ``progress=None`` shows tqdm bars only when stderr is a
    terminal. ``amp="auto"``: bf16 on CUDA where supported, else fp16 with a grad scaler; on a CPU bf16
    where native, else off (``amp_dtype``).
    ``channels_last=None`` picks the faster layout for the device (see ``use_channels_last``).
    ``compile``: run the training steps through ``torch.compile`` (after the DDP wrap; evaluation, EMA
    and checkpoints use the eager module, which shares the parameters); ``auto`` times the first steps
    eager and compiles when the announced work pays the compile back (``engine.compile_plan``).
    """

    epochs: int
    output_dir: str | None = None
    accum_steps: int = 1
    amp: str = "off"
    clip_grad: float | None = None
    ema_decay: float | None = None
    channels_last: bool | None = None
    resume: bool = False
    stop_after_epoch: int | None = None
    eval_every: int = 1
    progress: bool | None = None
    find_unused_parameters: bool = False
    compile: str = "off"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.accum_steps < 1:
            raise ConfigError(f"accum_steps must be at least 1, got {self.accum_steps}")
        check_choice("amp", self.amp, AMP_MODES)
        check_choice("compile", self.compile, COMPILE_CHOICES)
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"clip_grad must be positive (or None for no clipping), got {self.clip_grad}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be between 0 and 1 (or None for no EMA), got {self.ema_decay}")
        if self.stop_after_epoch is not None and not 1 <= self.stop_after_epoch <= self.epochs:
            raise ConfigError(f"stop_after_epoch must be in 1..{self.epochs}, got {self.stop_after_epoch}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be at least 1, got {self.eval_every}")
        if self.resume and self.output_dir is None:
            raise ConfigError("resume needs an output_dir holding the run to continue")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an AMP mode on a device (None: full precision).

    ``auto`` follows the hardware: on CUDA bf16 where supported, else fp16 with a grad scaler; on a
    CPU bf16 only where it is native (AVX512-BF16 or AMX), fp32 elsewhere, where oneDNN emulates bf16
    ~10x slower than fp32. An explicit ``bf16`` on such a CPU still runs, after a one-line warning.
    """
    if mode == "off":
        return None
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bf16(device) else None
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 AMP needs a CUDA device (it uses a grad scaler); use --amp bf16 on CPU")
    if mode == "bf16" and device.type == "cpu":
        warn_emulated_bf16(device)
    return torch.bfloat16 if mode == "bf16" else torch.float16


def use_channels_last(setting: bool | None, device: torch.device) -> bool:
    """The memory layout a run trains in: ``setting`` where given, else channels-last on CPU only.

    On CPU, oneDNN's channels-last convolutions made a PoolFormer-S12 training step 1.3-1.65x faster
    than NCHW in ``benchmarks/training.py`` runs; on an H200 NCHW was faster (channels-last 0.88x).
    """
    return device.type == "cpu" if setting is None else setting


FUSED_OPTIMIZERS = ("adam", "adamw")


def create_optimizer(
    model_or_params: nn.Module | Iterable[nn.Parameter],
    *,
    opt: str = "adamw",
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``, with torch's fused (one-kernel) Adam/AdamW where it applies.

    A model gets timm's parameter groups from its own ``no_weight_decay()`` (norms, biases, layer
    scales) and, with ``layer_decay``, its ``group_matcher()``: each group's ``lr_scale`` is
    ``layer_decay ** (layers after it)``, applied by the timm scheduler, so the head trains at ``lr``
    and the stem slowest. A list of parameters decays them all and takes no layer decay. The fused
    step gives the foreach step's values (equal to the bit in our tests) in a third of its time on
    CPU (the shapes Semantic FPN's optimizer step: 34 ms -> 10 ms).
    """
    from timm.optim import create_optimizer_v2

    if layer_decay is not None:
        if not isinstance(model_or_params, nn.Module) or not hasattr(model_or_params, "group_matcher"):
            raise ConfigError("layer decay needs a model with group_matcher(), not a list of parameters")
        if not 0.0 < layer_decay <= 1.0:
            raise ConfigError(f"layer decay must be in (0, 1], got {layer_decay}")
        kwargs["layer_decay"] = layer_decay
    if opt.lower() in FUSED_OPTIMIZERS:
        kwargs.setdefault("fused", True)
    return create_optimizer_v2(model_or_params, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr of the group trained fastest (the head's under layer decay; the only one without)."""
    return max(optimizer.param_groups, key=lambda group: group.get("lr_scale", 1.0))["lr"]


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor inside tuples, lists and dicts; 4-D float tensors optionally channels-last."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {key: to_device(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device, channels_last) for value in batch)
    return batch


def show_progress(progress: bool | None, info: DistInfo) -> bool:
    """tqdm only on rank 0, and by default only when stderr is a terminal."""
    if not info.is_main:
        return False
    return sys.stderr.isatty() if progress is None else progress


def progress_bar(iterable: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def evaluate(
    task: Task,
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """``task.evaluate`` in eval mode under no_grad and autocast, batches moved to ``device``.

    Also what ``classify eval`` uses outside training.
    """
    was_training = model.training
    model.eval()
    batches = (to_device(batch, device, channels_last) for batch in progress_bar(loader, progress, desc))
    try:
        with torch.no_grad(), autocast(device, dtype):
            return dict(task.evaluate(model, batches))
    finally:
        model.train(was_training)


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (so a resumed job continues each rank's stream)."""
    mine = run_state.rng_state()
    if not info.distributed:
        return [mine]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


class _Trainer:
    """One fit() call's mutable state; kept private so the public surface is ``fit`` and ``RunConfig``."""

    def __init__(self, task, model, optimizer, scheduler, train_loader, val_loader, config, info):
        self.task, self.optimizer, self.scheduler = task, optimizer, scheduler
        self.train_loader, self.val_loader, self.config, self.info = train_loader, val_loader, config, info
        self.device = info.device
        self.model = model.to(self.device)
        self.channels_last = use_channels_last(config.channels_last, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = amp_dtype(config.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.ema = None
        if config.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=config.ema_decay)
        self.out = Path(config.output_dir) if config.output_dir is not None else None
        self.start_epoch = 0
        self.num_updates = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self.metric_keys: set[str] = set()  # evaluate()'s keys other than loss, for curves.png
        self._plotted_at = -math.inf
        self.progress = show_progress(config.progress, info)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.switch: CompileSwitch | None = None
        self._compile_recorded = False

    # ----------------------------------------------------------------- resume
    def resume(self) -> None:
        if self.out is None:
            raise ConfigError("resume needs an output_dir holding the run to continue")
        path = self.out / run_state.STATE_FILE
        saved = load_state(path)
        if not isinstance(saved, dict) or saved.get("format") != "metaformer-train-state":
            raise CheckpointError(
                f"'{path}' is not a metaformer training state; use --overwrite to start again"
            )
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.scheduler is not None and saved["scheduler"] is not None:
                self.scheduler.load_state_dict(saved["scheduler"])
            if self.scaler is not None and saved["scaler"] is not None:
                self.scaler.load_state_dict(saved["scaler"])
            if self.ema is not None:
                if saved["ema"] is None:
                    raise CheckpointError(f"'{path}' was saved without EMA but this run uses EMA")
                self.ema.load_state_dict(saved["ema"])
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:200]
            raise CheckpointError(
                f"the training state in '{path}' does not fit this run ({first}); "
                "resume with the original options, or use --overwrite to start again"
            ) from None
        self.start_epoch = int(saved["epoch"])
        self.num_updates = int(saved["num_updates"])
        self.best_metric, self.best_epoch = saved["best_metric"], saved["best_epoch"]
        self.history = [dict(r) for r in saved["history"]][: self.start_epoch]
        standard = {"epoch", "train_loss", "lr", "seconds", "images_per_s"}
        for record in self.history:
            self.metric_keys.update(k for k in record if k not in standard and not k.endswith("val_loss"))
        rng = saved["rng"]
        if len(rng) == self.info.world_size:
            run_state.set_rng_state(rng[self.info.rank])
        else:
            logger.warning(
                "resuming with %d processes instead of %d: random streams differ from an uninterrupted run",
                self.info.world_size,
                len(rng),
            )
            run_state.set_rng_state(rng[self.info.rank % len(rng)])
        if self.info.is_main:
            run_state.write_metrics(self.out / run_state.METRICS_FILE, self.history)  # drops lines past it
        logger.info("resumed %s at epoch %d/%d", self.out, self.start_epoch, self.config.epochs)

    # ----------------------------------------------------------------- one epoch
    def train_one_epoch(self, model: nn.Module, epoch: int) -> tuple[float, int, float]:
        """Returns (mean train loss, samples seen by all ranks, seconds)."""
        cfg = self.config
        model.train()
        accum = cfg.accum_steps
        steps = len(self.train_loader)
        if steps == 0:
            raise ConfigError("the training loader yields no batch; lower the batch size or add images")
        loss_sum = 0.0
        count = 0
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        bar = progress_bar(self.train_loader, self.progress, f"epoch {epoch + 1}/{cfg.epochs}")
        switch = self.switch
        for i, batch in enumerate(bar):
            batch = to_device(batch, self.device, self.channels_last)
            boundary = (i + 1) % accum == 0 or i + 1 == steps
            timed = switch is not None and switch.timing
            step_start = time.perf_counter()
            step_model = switch.module_for_step(batch) if switch is not None else model
            try:
                loss_value, n = self._forward_backward(
                    step_model, batch, boundary, f"epoch {epoch + 1}, step {i + 1}"
                )
            except Exception as err:
                if (
                    switch is None
                    or not switch.first_compiled_steps(step_model)
                    or isinstance(err, ConfigError)
                ):
                    raise
                switch.compiled.fall_back(err)  # the backward's compile failed: this step again, eager
                loss_value, n = self._forward_backward(
                    model, batch, boundary, f"epoch {epoch + 1}, step {i + 1}"
                )
            if boundary:
                self._optimizer_step(model)
            if timed:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                switch.step_done(time.perf_counter() - step_start)
            loss_sum += loss_value * n
            count += n
            if self.progress and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{head_lr(self.optimizer):.2e}")
        seconds = time.perf_counter() - start
        totals = all_reduce_sum(
            torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=self.device)
        ).cpu()
        return float(totals[0] / max(totals[1], 1.0)), int(totals[1]), seconds

    def _forward_backward(
        self, model: nn.Module, batch: Any, boundary: bool, where: str
    ) -> tuple[float, int]:
        """One micro-batch: forward under autocast, the finite-loss check, the scaled backward."""
        ddp = unwrap_compiled(model)
        no_sync = isinstance(ddp, DistributedDataParallel) and not boundary
        with ddp.no_sync() if no_sync else nullcontext():
            with autocast(self.device, self.dtype):
                loss, n = self.task.train_step(model, batch)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise ConfigError(
                    f"the training loss became {loss_value} at {where}; "
                    "lower --lr, use --clip-grad, or turn off fp16 AMP"
                )
            scaled = loss / self.config.accum_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss_value, n

    def _optimizer_step(self, model: nn.Module) -> None:
        clip = self.config.clip_grad
        if self.scaler is not None:
            if clip is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_updates += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.num_updates)
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)

    # ----------------------------------------------------------------- run
    def run(self, summary_extra: Mapping[str, Any]) -> dict[str, Any]:
        cfg, info = self.config, self.info
        if self.out is not None and not cfg.resume:
            run_on_main(self._check_fresh_output, info)
        if cfg.resume:
            self.resume()
        model: nn.Module = self.model
        if info.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(
                self.model, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters
            )
        self.switch = CompileSwitch(
            cfg.compile,
            model,
            steps=(cfg.epochs - self.start_epoch) * len(self.train_loader),
            device=self.device,
            dtype=self.dtype,
            eager_module=self.model,
        )
        sampler = getattr(self.train_loader, "sampler", None)
        last_epoch = cfg.stop_after_epoch or cfg.epochs
        if self.start_epoch >= last_epoch:
            logger.info("nothing to train: %d of %d epochs already done", self.start_epoch, cfg.epochs)
        for epoch in range(self.start_epoch, last_epoch):
            epoch_start = time.perf_counter()
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            lr = head_lr(self.optimizer)  # the epoch's (first step's) lr of the head, not the stem
            train_loss, images, train_seconds = self.train_one_epoch(model, epoch)
            record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss}
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                record.update(self._evaluate_all())
            if self.scheduler is not None:
                self.scheduler.step(epoch + 1)
            record["lr"] = lr
            record["seconds"] = time.perf_counter() - epoch_start
            record["images_per_s"] = images / train_seconds if train_seconds > 0 else 0.0
            improved = self._track_best(record, epoch + 1)
            self.history.append(record)
            rng = _gather_rng(info)
            if info.is_main:
                self._record_compile(final=epoch + 1 == last_epoch)
                self._write_epoch(record, improved, rng, summary_extra)
        return self.summary(summary_extra)

    def _record_compile(self, final: bool) -> None:
        """config.json gets the compile decision once it is made, or at the end of a run that ended
        while ``auto`` was still timing (a resumed run replaces it with its own)."""
        config_file = self.out / run_state.CONFIG_FILE if self.out is not None else None
        if self._compile_recorded or self.switch is None or config_file is None or not config_file.exists():
            return
        if self.switch.decision is None and not final:
            return  # still timing the first steps
        config = run_state.read_json(config_file)
        config[COMPILE_DECISION_KEY] = self.switch.summary()
        run_state.write_json(config_file, config)
        self._compile_recorded = True

    def _check_fresh_output(self) -> None:
        """A safety net for callers that did not use ``state.prepare_run_dir``: never append to a run."""
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / run_state.STATE_FILE).exists() or (self.out / run_state.METRICS_FILE).exists():
            raise ConfigError(
                f"output folder '{self.out}' already holds a run; resume it, or clear it first "
                "(engine.state.prepare_run_dir with overwrite=True)"
            )

    def _evaluate_all(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        metrics = evaluate(
            self.task,
            self.model,
            self.val_loader,
            device=self.device,
            dtype=self.dtype,
            channels_last=self.channels_last,
            progress=self.progress,
        )
        result = {("val_loss" if key == "loss" else key): float(value) for key, value in metrics.items()}
        self.metric_keys.update(key for key in metrics if key != "loss")
        if self.ema is not None:
            ema_metrics = evaluate(
                self.task,
                self.ema.module,
                self.val_loader,
                device=self.device,
                dtype=self.dtype,
                channels_last=self.channels_last,
                progress=self.progress,
                desc="eval (EMA)",
            )
            result.update(
                {f"ema_{'val_loss' if k == 'loss' else k}": float(v) for k, v in ema_metrics.items()}
            )
        return result

    def _score_key(self) -> str:
        return f"ema_{self.task.primary_metric}" if self.ema is not None else self.task.primary_metric

    def _track_best(self, record: Mapping[str, Any], epoch: int) -> bool:
        score = record.get(self._score_key())
        if score is None:
            return False
        if self.best_metric is None or score > self.best_metric:
            self.best_metric, self.best_epoch = float(score), epoch
            return True
        return False

    def _deploy_model(self) -> nn.Module:
        """The weights a user would deploy: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def _write_epoch(
        self, record: Mapping[str, Any], improved: bool, rng: list[dict[str, Any]], extra: Mapping[str, Any]
    ) -> None:
        if self.out is None:
            self._log_epoch(record)
            return
        out = self.out
        # weights first, then the resume state (it records the epoch as done), then what is derived from it
        self.task.save_weights(self._deploy_model(), out / run_state.LAST_WEIGHTS)
        if improved:
            self.task.save_weights(self._deploy_model(), out / run_state.BEST_WEIGHTS)
        save_state(
            run_state.training_state(
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                ema=self.ema,
                epoch=int(record["epoch"]),
                num_updates=self.num_updates,
                best_metric=self.best_metric,
                best_epoch=self.best_epoch,
                history=self.history,
                rng=rng,
            ),
            out / run_state.STATE_FILE,
        )
        run_state.write_metrics(out / run_state.METRICS_FILE, self.history)
        run_state.write_json(out / run_state.SUMMARY_FILE, self.summary(extra))
        self._log_epoch(record)
        last = record["epoch"] in (self.config.epochs, self.config.stop_after_epoch)
        if last or time.monotonic() - self._plotted_at >= PLOT_INTERVAL_S:
            self.plot()

    def plot(self) -> None:
        """Redraw curves.png (at the end of a run, and at most once a minute before that)."""
        if self.out is None or not self.history:
            return
        self._plotted_at = time.monotonic()
        try:
            run_state.plot_curves(self.history, self.out / run_state.CURVES_FILE, sorted(self.metric_keys))
        except (ImportError, RuntimeError, ValueError) as err:  # a plot must never stop a run
            logger.warning("could not draw %s: %s", run_state.CURVES_FILE, err)

    def _log_epoch(self, record: Mapping[str, Any]) -> None:
        parts = [f"epoch {record['epoch']}/{self.config.epochs}"]
        for key, value in record.items():
            if key in ("epoch", "seconds", "images_per_s", "lr"):
                continue
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
        parts.append(f"lr {record['lr']:.3g}")
        parts.append(f"{record['seconds']:.1f}s")
        parts.append(f"{record['images_per_s']:.0f} img/s")
        logger.info("  ".join(parts))

    def summary(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        primary = self.task.primary_metric
        speeds = [r["images_per_s"] for r in self.history if r.get("images_per_s")]
        summary: dict[str, Any] = {
            f"best_{primary}": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_from_ema": self.ema is not None,
            "epochs": len(self.history),
            "epochs_planned": self.config.epochs,
            "world_size": self.info.world_size,
            "params": self.params,
            "train_images_per_s": sum(speeds) / len(speeds) if speeds else None,
            "train_seconds": sum(r["seconds"] for r in self.history),
            "last": self.history[-1] if self.history else None,
        }
        if self.switch is not None:
            summary[COMPILE_DECISION_KEY] = self.switch.summary()
        summary.update(extra)
        return summary


def fit(
    task: Task,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    train_loader: Any,
    val_loader: Iterable[Any] | None,
    config: RunConfig,
    *,
    dist_info: DistInfo | None = None,
    summary_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``config.epochs`` epochs (resuming if asked) and return the run summary.

    ``model`` must already hold its parameters in the optimizer; it is moved to ``dist_info.device``
    and wrapped in DDP here when torchrun started several processes. ``scheduler`` is a timm
    scheduler (or None). ``summary_extra`` is merged into summary.json (e.g. skipped image counts).
    The caller owns the process group (``init_distributed`` / ``cleanup_distributed``).
    """
    info = dist_info or DistInfo()
    trainer = _Trainer(task, model, optimizer, scheduler, train_loader, val_loader, config, info)
    try:
        return trainer.run(dict(summary_extra or {}))
    except Exception as caught:
        err = from_worker(caught)  # a data error a loader worker found: its own sentence, not torch's wrapper
        if isinstance(err, RuntimeError) and "out of memory" in str(err).lower():
            raise ConfigError(f"out of memory ({str(err).splitlines()[0]}); lower --batch-size") from None
        if err is caught:
            raise
        raise err from None

"""The one training skeleton every task's ``train_*`` goes through.

Resolve the config, open the run folder (rank 0), seed, let the task build its data, model, optimizer,
schedule and ``Task``, write config.json, then ``fit``. A task gives only what is its own, as a
``TrainingSpec``; everything here is shared by classification, detection and segmentation.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from metaformer.engine import state as run_state
from metaformer.engine.distributed import (
    DistInfo,
    broadcast_object,
    distributed_run,
    eval_sampler,
    run_on_main,
    train_sampler,
)
from metaformer.engine.loop import RunConfig, Task, evaluate, fit, show_progress
from metaformer.errors import ConfigError

logger = logging.getLogger(__name__)

# Options that may change between a run and its --resume, in every task
RESUME_MAY_DIFFER = (
    "resume",
    "overwrite",
    "num_workers",
    "progress",
    "stop_after_epoch",
    "device",
    "compile",  # speed only: the steps are the same math
    "compile_decision",
)


@dataclass
class TrainingParts:
    """What a task builds for one run. ``describe``: the log line that opens the run; ``summary``: the
    task's own summary fields; ``record``: extra config.json fields (class names...); ``epochs`` /
    ``eval_every``: where the task derives them (segmentation counts iterations)."""

    task: Task
    model: nn.Module
    optimizer: Any
    scheduler: Any
    train_loader: DataLoader
    val_loader: DataLoader
    describe: str
    summary: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    eval_every: int | None = None


@dataclass(frozen=True)
class TrainingSpec:
    """A task's own part of a training run; the config resolves itself (``config.resolve(world_size)``).

    ``build(config, info)``: the parts (datasets, loaders, model, optimizer, schedule, Task).
    ``finish(config, summary, parts)``: the closing log line's result text (rank 0; it may add fields
    to the summary). ``default_data``: the summary's data name when ``config.data`` is None.
    ``before_run_dir(config)``: checks that must fail before the run folder is created.
    ``prepare(config, info)``: work on rank 0 before anyone reads the data (generating a data set).
    ``may_differ``: this task's fields that may change on --resume.
    """

    name: str
    build: Callable[[Any, DistInfo], TrainingParts]
    finish: Callable[[Any, dict[str, Any], TrainingParts], str]
    default_data: str
    before_run_dir: Callable[[Any], None] | None = None
    prepare: Callable[[Any, DistInfo], None] | None = None
    may_differ: tuple[str, ...] = ()


def default_output(kind: str, model: str) -> str:
    """runs/<kind>/<model>-<timestamp>."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / kind / f"{model}-{stamp}")


def train(config: Any, spec: TrainingSpec) -> dict[str, Any]:
    """Train (or resume) one run of ``spec``'s task and return its summary (also summary.json).

    Under torchrun every process calls this; rank 0 alone writes the run folder.
    """
    with distributed_run(config.device) as info:
        return _train(config, spec, info)


def _train(config: Any, spec: TrainingSpec, info: DistInfo) -> dict[str, Any]:
    resolved = config.resolve(info.world_size)
    output = resolved.output or str(broadcast_object(default_output(spec.name, resolved.model)))
    resolved = dataclasses.replace(resolved, output=output)
    current = {**resolved.to_dict(), "world_size": info.world_size}
    if spec.before_run_dir is not None:
        spec.before_run_dir(resolved)
    prepare = partial(
        run_state.open_run_dir,
        output,
        resume=resolved.resume,
        overwrite=resolved.overwrite,
        config=current,
        may_differ=(*RESUME_MAY_DIFFER, *spec.may_differ),
    )
    run_on_main(prepare, info)
    if spec.prepare is not None:
        spec.prepare(resolved, info)
    run_state.seed_everything(resolved.seed + info.rank)
    parts = spec.build(resolved, info)
    if info.is_main:
        logger.info("%s, %d process(es), output %s", parts.describe, info.world_size, output)
        if not resolved.resume:
            run_state.write_json(Path(output) / run_state.CONFIG_FILE, {**current, **parts.record})
    run = RunConfig(
        epochs=int(parts.epochs if parts.epochs is not None else resolved.epochs),
        output_dir=output,
        accum_steps=resolved.accum_steps or 1,
        amp=resolved.amp or "off",
        clip_grad=resolved.clip_grad,
        ema_decay=getattr(resolved, "ema_decay", None),
        channels_last=resolved.channels_last,
        resume=resolved.resume,
        stop_after_epoch=resolved.stop_after_epoch,
        eval_every=int(parts.eval_every or resolved.eval_every or 1),
        progress=resolved.progress,
        compile=getattr(resolved, "compile", "off"),
    )
    summary_extra = {
        "task": spec.name,
        "model": resolved.model,
        "recipe": resolved.recipe,
        "data": resolved.data or spec.default_data,
        **parts.summary,
        "train_images": len(parts.train_loader.dataset),  # type: ignore[arg-type]
        "val_images": len(parts.val_loader.dataset),  # type: ignore[arg-type]
        "output": output,
    }
    loaders = parts.train_loader, parts.val_loader
    summary = fit(
        parts.task, parts.model, parts.optimizer, parts.scheduler, *loaders, run, dist_info=info,
        summary_extra=summary_extra,
    )  # fmt: skip
    if info.is_main:
        closing = spec.finish(resolved, summary, parts)
        run_state.write_json(Path(output) / run_state.SUMMARY_FILE, summary)
        logger.info("%s; weights in %s", closing, Path(output) / run_state.BEST_WEIGHTS)
    return summary


def seeded_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``limit`` items in index order (all of them when limit is None or larger):
    the first ``limit`` of numpy's ``RandomState(seed)`` permutation, the selection every task uses (the
    digits demo's published figures were made with it)."""
    n = len(dataset)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return dataset
    order = np.random.RandomState(seed).permutation(n)[:limit]
    return Subset(dataset, sorted(int(i) for i in order))


def share_cores_with_loaders(workers: int) -> int:
    """PyTorch's threads for a CPU run whose ``workers`` loader processes share its cores: cores - workers,
    and at least half the cores. With more busy threads than cores every OpenMP barrier waits for a
    descheduled thread: the Fashion-MNIST trunk with one loader on 2 idle cores trained 1,150-1,170 img/s
    on 2 threads and 1,370-1,500 on 1 (and several times slower still on a busy machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    target = max(1, cores // 2, cores - workers)
    if torch.get_num_threads() > target:
        logger.info("%d loader process(es) on %d cores: PyTorch runs %d thread(s)", workers, cores, target)
        torch.set_num_threads(target)
    return torch.get_num_threads()


def data_loaders(
    config: Any,
    train: Dataset,
    val: Dataset,
    info: DistInfo,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    val_batch_size: int | None = None,
    subset: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """The train loader (sharded, seeded, whole batches) and the val loader (sharded) of a resolved
    run config, on seeded subsets of ``limit_train`` / ``limit_val`` images (``subset=False``: the
    task has taken them already)."""
    seed, batch_size, num_workers = config.seed, int(config.batch_size), int(config.num_workers)
    if subset:
        train = seeded_subset(train, config.limit_train, seed)
        val = seeded_subset(val, config.limit_val, seed + 1)
    per_rank = len(train) // info.world_size  # type: ignore[arg-type]
    if per_rank < batch_size:
        raise ConfigError(
            f"batch size {batch_size} is larger than the {per_rank} training images per process; "
            "lower --batch-size"
        )
    if info.device.type == "cpu" and num_workers > 0:
        share_cores_with_loaders(num_workers)
    common: Mapping[str, Any] = {
        "collate_fn": collate_fn,
        "num_workers": num_workers,
        "pin_memory": info.device.type == "cuda",
        "persistent_workers": num_workers > 0,
    }
    train_loader = DataLoader(
        train, batch_size=batch_size, sampler=train_sampler(train, info, seed), drop_last=True, **common
    )
    val_loader = DataLoader(
        val, batch_size=val_batch_size or batch_size, sampler=eval_sampler(val, info), **common
    )
    return train_loader, val_loader


def evaluate_dataset(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    batch_size: int = 1,
    num_workers: int = 0,
    progress: bool | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    **evaluate_kwargs: Any,
) -> tuple[dict[str, float], float]:
    """(metrics, seconds) of ``model`` (on ``device``) over ``dataset``: what every eval command runs after
    loading its checkpoint and data."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
    )
    start = time.perf_counter()
    metrics = evaluate(
        task, model, loader, device=device, progress=show_progress(progress, DistInfo()), **evaluate_kwargs
    )
    return metrics, time.perf_counter() - start


__all__ = [
    "TrainingParts",
    "TrainingSpec",
    "data_loaders",
    "default_output",
    "evaluate_dataset",
    "seeded_subset",
    "train",
]

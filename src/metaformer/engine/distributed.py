"""Data-parallel runs under torchrun: process group from the environment, samplers, metric reduction.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and the rendezvous address); a plain
``python -m metaformer`` run has none of them and is a world of one. The backend follows the device:
gloo on CPU, nccl on CUDA. Only rank 0 writes files and logs (``is_main``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from metaformer.errors import ConfigError, MetaformerError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; ``world_size == 1`` for a plain run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer; launch with torchrun"
        ) from None


def pick_device(device: str | None = None) -> torch.device:
    """'cuda' when available unless told otherwise; 'cpu' always works."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' was asked for but CUDA is not available; use --device cpu")
    return dev


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if the environment names one, else return a world of one."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = pick_device(device)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.debug("rank %d/%d (local %d) on %s via %s", rank, world_size, local_rank, dev, backend)
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op for a single process); returns the summed tensor."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: object) -> object:
    """Rank 0's value on every rank (a no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def run_on_main(fn: Callable[[], T], info: DistInfo) -> T | None:
    """Run ``fn`` on rank 0 only (file writes); its error is raised on every rank, so none waits forever."""
    result: T | None = None
    error: BaseException | None = None
    if info.is_main:
        try:
            result = fn()
        except (MetaformerError, OSError) as err:
            error = err
    if info.distributed:
        shared = broadcast_object(None if error is None else (type(error), str(error)))
        if shared is not None and error is None:
            error_type, message = shared  # type: ignore[misc]
            raise error_type(message)
    if error is not None:
        raise error
    return result


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each sample evaluated exactly once, no padding.

    ``DistributedSampler`` pads the last shard with repeats, which would bias summed metrics.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def train_sampler(dataset: Dataset, info: DistInfo, seed: int) -> Sampler[int]:
    """Shuffling sampler; under DDP a ``DistributedSampler`` whose ``set_epoch`` the loop calls."""
    if info.distributed:
        return DistributedSampler(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed, drop_last=True
        )
    return RandomSampler(dataset)


def eval_sampler(dataset: Dataset, info: DistInfo) -> Sampler[int]:
    if info.distributed:
        return ShardSampler(dataset, info.rank, info.world_size)
    return SequentialSampler(dataset)


@contextmanager
def distributed_run(device: str | None) -> Iterator[DistInfo]:
    """Join (or start) the torchrun process group for one run; leave only a group this call created."""
    owns_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(device)
    try:
        yield info
    finally:
        if owns_group:
            cleanup_distributed()

"""engine/skeleton.py: how a CPU run shares its cores with its loader processes."""

import pytest
import torch

from metaformer.engine import skeleton


@pytest.fixture
def threads_kept():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("cores", "threads", "workers", "expected"),
    [
        (2, 2, 1, 1),  # one loader on a 2-core machine: no oversubscription
        (8, 8, 7, 4),  # at least half the cores stay with PyTorch
        (16, 16, 1, 15),
        (4, 2, 1, 2),  # already fewer threads than cores - workers: left alone
        (1, 1, 1, 1),
    ],
)
def test_loader_processes_take_their_cores_from_pytorch(
    monkeypatch, threads_kept, cores, threads, workers, expected
):
    monkeypatch.setattr(skeleton.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    torch.set_num_threads(threads)
    assert skeleton.share_cores_with_loaders(workers) == expected
    assert torch.get_num_threads() == expected

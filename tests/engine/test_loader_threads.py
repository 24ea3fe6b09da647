"""A CPU run with loader processes gives PyTorch the cores the loaders leave (engine/skeleton.py)."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from metaformer.engine import skeleton
from metaformer.engine.distributed import DistInfo


@pytest.fixture
def threads_kept():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("threads_kept")
@pytest.mark.parametrize(("workers", "expected"), [(1, 3), (0, 4)])
def test_building_cpu_loaders_leaves_the_loaders_their_cores(monkeypatch, workers, expected):
    monkeypatch.setattr(skeleton.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    torch.set_num_threads(4)
    config = SimpleNamespace(seed=0, batch_size=2, num_workers=workers, limit_train=None, limit_val=None)
    data = TensorDataset(torch.zeros(8, 1))
    skeleton.data_loaders(config, data, data, DistInfo())
    assert torch.get_num_threads() == expected

import logging
import os
import random

import numpy as np
import pytest
import torch

# Route probes time candidates, which only costs time in a test run: each test takes every route's
# portable choice unless it asks for another (tests/models/test_routes.py measures for real).
os.environ.setdefault("METAFORMER_ROUTE_PROBE", "0")

# pytest-xdist's workers share the cores: each one's PyTorch (and every process a test starts, through
# OMP_NUM_THREADS) gets its share, so the OpenMP threads of two workers never spin against each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _share = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_share)
    torch.set_num_threads(_share)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on 2 shared cores extra OpenMP threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def warned():
    """The warning sentences metaformer logs, read by a handler on its own logger (earlier tests in the
    process may have left the root logger's handlers and the logger's propagation changed)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log, handler = logging.getLogger("metaformer"), Keep(logging.WARNING)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if level == logging.NOTSET or level > logging.WARNING else level)
    yield lambda: list(seen)
    log.removeHandler(handler)
    log.setLevel(level)


@pytest.fixture(scope="session")
def tiny_digits_run(tmp_path_factory):
    """One tiny digits run (1 epoch, 32 px) for the tests that only read it: its folder, with
    last.safetensors and the config.json that names the embedded digits."""
    from metaformer.tasks.classify.config import TrainConfig
    from metaformer.tasks.classify.train import train_classifier

    out = tmp_path_factory.mktemp("tiny_digits_run")
    tiny = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
    train_classifier(
        TrainConfig(
            output=str(out), model_kwargs=tiny, epochs=1, batch_size=32, limit_train=96, limit_val=40,
            progress=False,
        )
    )  # fmt: skip
    return out

import os
import random

import numpy as np
import pytest
import torch

# Route probes time candidates, which only costs time in a test run: each test takes every route's
# portable choice unless it asks for another (tests/models/test_routes.py measures for real).
os.environ.setdefault("METAFORMER_ROUTE_PROBE", "0")


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

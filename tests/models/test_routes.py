"""Route choice: measured, never the slower candidate, cached per machine, overridable."""

import json
import time

import pytest
import torch

from metaformer import ConfigError
from metaformer.models import routes


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    routes.reset()
    yield
    routes.reset()


def sleeper(seconds, calls=None):
    def run():
        if calls is not None:
            calls.append(1)
        time.sleep(seconds)

    return run


def test_the_faster_candidate_wins_and_is_cached_on_disk(tmp_path):
    slow, fast = [], []
    choice = routes.choose(
        "train_mlp", "probe", {"conv": sleeper(0.004, slow), "gemm": sleeper(0.0005, fast)}
    )
    assert choice == "gemm"
    assert len(slow) >= routes.MIN_ROUNDS + 1 and len(fast) == len(slow)  # interleaved, warm-up included
    [decision] = routes.decisions(include_cached=False)
    assert decision.times_ms["conv"] > decision.times_ms["gemm"]
    files = list((tmp_path / "routes").glob("*.json"))
    assert len(files) == 1 and torch.__version__.split("+")[0] in files[0].name
    stored = json.loads(files[0].read_text())
    assert stored[f"train_mlp|{decision.shape_class}"]["choice"] == "gemm"

    routes.reset()  # a new process: the cache answers, nothing is measured again
    again = []
    assert (
        routes.choose("train_mlp", "probe", {"conv": sleeper(0, again), "gemm": sleeper(0, again)}) == "gemm"
    )
    assert again == [] and routes.decisions()[0].source == "cache"


def test_a_candidate_that_raises_is_left_out():
    def broken():
        raise RuntimeError("could not create a primitive descriptor")

    assert routes.choose("fast_mlp", "broken", {"gemm": sleeper(0.002), "onednn": broken}) == "gemm"


def test_the_environment_overrides_and_is_checked(monkeypatch):
    calls = []
    monkeypatch.setenv("METAFORMER_ROUTE_FAST_MLP", "conv")
    assert routes.choose("fast_mlp", "x", {"gemm": sleeper(0, calls), "conv": sleeper(0, calls)}) == "conv"
    assert calls == []
    assert any(d.source == "env" for d in routes.decisions())
    monkeypatch.setenv("METAFORMER_ROUTE_FAST_MLP", "fastest")
    with pytest.raises(ConfigError, match="METAFORMER_ROUTE_FAST_MLP=fastest is not a choice.*gemm"):
        routes.choose("fast_mlp", "x", {"gemm": sleeper(0)})


def test_probing_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("METAFORMER_ROUTE_PROBE", "0")
    calls = []
    assert (
        routes.choose("fast_chunk", "x", {"whole": sleeper(0, calls), "chunked": sleeper(0, calls)})
        == "whole"
    )
    assert calls == []


def test_a_probe_leaves_the_random_stream_as_it_was():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    routes.choose(
        "train_pool_mix", "rng", {"torch": lambda: torch.rand(100), "native": lambda: torch.rand(100)}
    )
    assert torch.equal(torch.rand(4), expected)


def test_shape_classes_and_thread_counts_are_decided_apart():
    for shape_class in ("a", "b"):
        routes.choose("fast_chunk", shape_class, {"whole": sleeper(0), "chunked": sleeper(0)})
    assert len(routes.decisions()) == 2
    assert all(d.shape_class.endswith(f"-t{torch.get_num_threads()}") for d in routes.decisions())


def test_an_unwritable_cache_only_costs_a_probe(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("METAFORMER_HOME", str(blocker))  # routes/ cannot be created under a file
    assert routes.choose("fast_mlp", "x", {"gemm": sleeper(0.002), "onednn": sleeper(0)}) == "onednn"


def test_buckets_are_powers_of_two():
    assert [routes.bucket(n) for n in (1, 2, 3, 31, 32, 33)] == [1, 2, 4, 32, 32, 64]


def test_probing_inside_activation_checkpointing_trains_as_without_it():
    from metaformer import create_model

    torch.manual_seed(0)
    model = create_model(
        "poolformer_s12", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=10, drop_path_rate=0.2
    ).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)
        model(x).logsumexp(1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    first = grads(True)  # every route is measured inside the checkpointed blocks
    assert {d.route for d in routes.decisions()} >= {"train_pool_mix", "train_mlp"}
    for a, b in zip(first, grads(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fewer_candidates_take_the_fastest_measured_and_leave_the_decision(tmp_path):
    """A kernel switched off for a block of code (one candidate fewer) must not overwrite the choice
    measured with every candidate, in memory or on disk."""
    full = {"conv": sleeper(0.003), "gemm": sleeper(0.002), "fused": sleeper(0.0005)}
    assert routes.choose("train_mlp", "fewer", full) == "fused"
    calls = []
    narrower = {"conv": sleeper(0.003, calls), "gemm": sleeper(0.002, calls)}
    assert routes.choose("train_mlp", "fewer", narrower) == "gemm"  # the faster of the two, as measured
    assert calls == []  # nothing measured again
    assert routes.choose("train_mlp", "fewer", full) == "fused"
    routes.reset()
    assert routes.choose("train_mlp", "fewer", narrower) == "gemm" and calls == []  # from the disk cache


def test_a_cached_choice_is_measured_again_when_a_candidate_is_new():
    """A newer version may bring a route the cache never timed: it is measured, not ignored."""
    assert routes.choose("train_mlp", "new", {"conv": sleeper(0.003), "gemm": sleeper(0.0015)}) == "gemm"
    routes.reset()
    calls = []
    now = {"conv": sleeper(0.003), "gemm": sleeper(0.0015), "fused": sleeper(0.0002, calls)}
    assert routes.choose("train_mlp", "new", now) == "fused" and calls
    routes.reset()
    assert routes.decisions()[0].choice == "fused"


def bursty(seconds, burst, calls):
    """A candidate whose every other call is slowed by a burst of another process's work."""

    def run():
        calls.append(1)
        time.sleep(seconds + (burst if len(calls) % 2 == 0 else 0.0))

    return run


def test_bursts_of_interference_do_not_decide():
    """The fastest round, not the median: a burst that lands on one candidate's rounds (as another
    tenant's work does on a shared host) leaves the choice to what each costs."""
    calls = []
    choice = routes.choose(
        "train_mlp", "bursts", {"conv": sleeper(0.004), "gemm": bursty(0.001, 0.02, calls)}
    )
    assert choice == "gemm"
    [decision] = routes.decisions(include_cached=False)
    assert decision.times_ms["gemm"] < 3 and decision.times_ms["conv"] >= 4


def test_a_close_cached_call_is_measured_again_and_merged(tmp_path):
    """A cached choice whose runner-up was within CLOSE is re-measured by the next few processes,
    each keeping every candidate's fastest time over all probes; then it stands. A clear one is never
    re-measured (the first test)."""
    cache = routes._cache_file()
    first = {"conv": sleeper(0.0021), "gemm": sleeper(0.002)}
    assert routes.choose("train_mlp", "close", first) == "gemm"
    key = f"train_mlp|close-t{torch.get_num_threads()}"
    stored = json.loads(cache.read_text())[key]
    assert stored["probes"] == 1
    # as if that probe had been unlucky for conv: the next process measures both again
    stored["times_ms"] = {"conv": 50.0, "gemm": 45.0}
    cache.write_text(json.dumps({key: stored}))
    for probes in range(2, routes.RECHECKS + 1):
        routes.reset()
        calls = []
        now = {"conv": sleeper(0.001, calls), "gemm": sleeper(0.004, calls)}
        assert routes.choose("train_mlp", "close", now) == "conv" and calls
        merged = json.loads(cache.read_text())[key]
        assert merged["probes"] == probes and merged["times_ms"]["conv"] < 4
        assert merged["times_ms"]["gemm"] < 45.0  # the fastest over both probes
        if merged["times_ms"]["gemm"] > merged["times_ms"]["conv"] * (1 + routes.CLOSE):
            break  # no longer close: it stands from here on
    routes.reset()
    calls = []
    later = {"conv": sleeper(0, calls), "gemm": sleeper(0, calls)}
    assert routes.choose("train_mlp", "close", later) == "conv"
    assert calls == [] and routes.decisions()[0].source == "cache"


def test_a_close_call_stands_after_its_rechecks(tmp_path):
    assert routes.choose("train_mlp", "even", {"conv": sleeper(0.002), "gemm": sleeper(0.002)})
    for _ in range(routes.RECHECKS - 1):
        routes.reset()
        routes.choose("train_mlp", "even", {"conv": sleeper(0.002), "gemm": sleeper(0.002)})
    routes.reset()
    calls = []
    routes.choose("train_mlp", "even", {"conv": sleeper(0.002, calls), "gemm": sleeper(0.002, calls)})
    assert calls == []  # RECHECKS probes done: no more measuring in later processes
    assert routes.decisions()[0].probes == routes.RECHECKS


def test_a_narrower_call_does_not_recheck_a_close_choice(tmp_path):
    """Code with a kernel switched off (one candidate fewer) must not re-measure a close cached call
    on its narrower set and overwrite the decision made with every candidate."""
    full = {"conv": sleeper(0.0021), "gemm": sleeper(0.002), "fused": sleeper(0.0019)}
    assert routes.choose("train_mlp", "narrow", full) == "fused"
    before = json.loads(routes._cache_file().read_text())
    routes.reset()
    calls = []
    narrower = {"conv": sleeper(0.0021, calls), "gemm": sleeper(0.002, calls)}
    assert routes.choose("train_mlp", "narrow", narrower) == "gemm"  # the faster of the two, as measured
    assert calls == [] and json.loads(routes._cache_file().read_text()) == before


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",  # a write cut short
        b"\x00\xff\xfe garbage",  # not text at all
        b"[1, 2, 3]",  # JSON, but not an object
        b'{"train_mlp|probe-t1": "gemm", "train_mlp|probe-t2": {"choice": 3, "times_ms": "fast"}}',
    ],
    ids=["truncated", "binary", "list", "wrong-entries"],
)
def test_a_corrupt_cache_file_is_measured_over_and_rewritten(content):
    path = routes._cache_file()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    routes.reset()
    assert isinstance(routes.decisions(), list)  # `info --system` lists what it can read
    calls = []
    slow_then_fast = {"conv": sleeper(0.004, calls), "gemm": sleeper(0.0005, calls)}
    assert routes.choose("train_mlp", "probe", slow_then_fast) == "gemm"
    assert calls  # measured, not taken from the broken file
    stored = json.loads(path.read_text())  # rewritten as valid JSON with the new decision
    assert stored[f"train_mlp|probe-t{torch.get_num_threads()}"]["choice"] == "gemm"

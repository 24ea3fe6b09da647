import pytest
import torch

from metaformer.engine.distributed import DistInfo, ShardSampler, init_distributed, run_on_main
from metaformer.errors import ConfigError


def test_plain_process_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert info.device == torch.device("cpu")


def test_shard_sampler_covers_every_index_once_without_padding():
    data = list(range(11))
    shards = [list(ShardSampler(data, rank, 3)) for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == data
    assert [len(ShardSampler(data, rank, 3)) for rank in range(3)] == [4, 4, 3]


def test_run_on_main_returns_or_raises_on_a_single_process():
    assert run_on_main(lambda: 7, DistInfo()) == 7

    def fail():
        raise ConfigError("bad output")

    with pytest.raises(ConfigError, match="bad output"):
        run_on_main(fail, DistInfo())


def test_bad_torchrun_environment_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_distributed("cpu")

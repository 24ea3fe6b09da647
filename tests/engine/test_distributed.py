from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from metaformer import create_model
from metaformer.engine.distributed import (
    DistInfo,
    ShardSampler,
    cleanup_distributed,
    init_distributed,
    run_on_main,
)
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


# --------------------------------------------------------------------------- two processes against one
# 2 processes x 32 images per step must train to the weights and metrics of 1 process x 64 (DDP averages
# the two halves' gradients: the mean over 64), and evaluation must count each of the 33 validation
# images once (an odd count: a padding sampler would count one twice). A job whose ranks do not
# synchronise gradients, or whose metrics are rank 0's share only, fails here.
TRAIN_IMAGES, VAL_IMAGES, EPOCHS = 64, 33, 3


def _data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(TRAIN_IMAGES + VAL_IMAGES, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (TRAIN_IMAGES + VAL_IMAGES,), generator=generator)
    images += labels.view(-1, 1, 1, 1).float()  # learnable: the class shifts the image's mean
    return (
        TensorDataset(images[:TRAIN_IMAGES], labels[:TRAIN_IMAGES]),
        TensorDataset(images[TRAIN_IMAGES:], labels[TRAIN_IMAGES:]),
    )


def train_data_parallel(info: DistInfo, compile: str = "off") -> dict:
    """One process's part of the run: the engine's samplers, DDP wrapping, loop and metric reduction
    (``compile="on"``: the DDP-wrapped model compiled, with aot_eager: Dynamo's DDP graph split and
    AOTAutograd without Inductor's C++ build)."""
    from metaformer.engine.loop import RunConfig, create_optimizer, fit
    from metaformer.engine.skeleton import data_loaders
    from metaformer.tasks.classify import ClassificationTask

    torch.manual_seed(0)  # the same initial weights on every rank
    model = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=3,
                         drop_path_rate=0.0)  # fmt: skip
    optimizer = create_optimizer(model, lr=0.01, weight_decay=0.05)
    options = SimpleNamespace(seed=0, batch_size=TRAIN_IMAGES // info.world_size, num_workers=0,
                              limit_train=None, limit_val=None)  # fmt: skip
    train_loader, val_loader = data_loaders(options, *_data(), info)
    task = ClassificationTask(["a", "b", "c"])
    if compile != "off":
        from metaformer.engine import compile_plan

        compile_plan.BACKEND = "aot_eager"
    config = RunConfig(epochs=EPOCHS, channels_last=False, compile=compile)
    summary = fit(task, model, optimizer, None, train_loader, val_loader, config, dist_info=info)
    return {
        "state": model.state_dict(),
        "last": summary["last"],
        "evaluated": int(task.confusion.sum()),
        "compiled": bool(summary["compile_decision"]["used"]),
    }


def _worker_main(rank: int, port: int, out: str, compile: str = "off") -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        torch.save(train_data_parallel(info, compile), out)
    finally:
        cleanup_distributed()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("compile", ["off", "on"], ids=["eager", "compiled-after-ddp"])
def test_two_processes_train_and_evaluate_like_one_with_the_whole_batch(tmp_path, one_thread, compile):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    here = str(Path(__file__).parent)
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {here!r}); import test_distributed as t; "
                f"t._worker_main({rank}, {port}, {str(tmp_path / f'rank{rank}.pt')!r}, {compile!r})",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, METAFORMER_HOME=str(tmp_path / "home")),  # the compile record
        )  # fmt: skip
        for rank in range(2)
    ]
    reference = train_data_parallel(DistInfo())  # meanwhile: one process, the whole batch
    for child in children:
        output, _ = child.communicate(timeout=200)
        assert child.returncode == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert reference["evaluated"] == VAL_IMAGES
    for result in ranks:
        assert result["compiled"] == (compile == "on")
        assert result["evaluated"] == VAL_IMAGES  # every image once, summed over the ranks
        for name, value in reference["state"].items():
            if name.endswith("norm1.bias"):  # cancels in pool(y) - y: a gradient of pure rounding noise,
                continue  # which AdamW turns into full-size steps of either sign
            torch.testing.assert_close(result["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)
        for key in ("train_loss", "val_loss", "top1"):
            assert result["last"][key] == pytest.approx(reference["last"][key], rel=1e-4, abs=1e-6), key
    torch.manual_seed(0)
    initial = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=3)
    moved = (initial.head.fc.weight - reference["state"]["head.fc.weight"]).abs().max()
    assert moved > 1e-2  # training moved the weights far beyond the tolerance above

"""The shared loop, driven by a detection-shaped toy task: targets are lists of dicts, the model
returns a loss dict in train mode. Classification runs the same loop in tests/tasks/test_classify.py."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from metaformer.engine.loop import (
    RunConfig,
    amp_dtype,
    create_optimizer,
    fit,
    head_lr,
    to_device,
    use_channels_last,
)
from metaformer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class ToyDetector(nn.Module):
    """Predicts a scalar per image; train mode returns a loss dict like torchvision detectors."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, images, targets=None):
        out = self.net(images).squeeze(1)
        if self.training:
            goal = torch.stack([t["value"] for t in targets])
            return {"loss_value": ((out - goal) ** 2).mean(), "loss_reg": 1e-4 * out.abs().mean()}
        return out


class DictLossTask:
    primary_metric = "neg_mse"

    def train_step(self, model, batch):
        images, targets = batch
        losses = model(images, targets)
        return sum(losses.values()), len(images)

    def evaluate(self, model, loader):
        total = count = 0.0
        for images, targets in loader:
            goal = torch.stack([t["value"] for t in targets])
            total += float(((model(images) - goal) ** 2).sum())
            count += len(images)
        return {"loss": total / count, "neg_mse": -total / count}

    def save_weights(self, model, path):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _data(n=48):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 2, 2, generator=gen)
    return [(images[i], {"value": images[i].sum() * 0.5, "boxes": torch.zeros(0, 4)}) for i in range(n)]


def _collate(items):
    return torch.stack([i for i, _ in items]), [t for _, t in items]


def _run(tmp_path, name, epochs=3, **overrides):
    torch.manual_seed(0)
    model = ToyDetector()
    optimizer = torch.optim.AdamW(model.parameters(), lr=overrides.pop("lr", 0.02))
    batch = overrides.pop("batch_size", 8)
    train = DataLoader(_data(), batch_size=batch, shuffle=True, collate_fn=_collate)
    val = DataLoader(_data(16), batch_size=8, collate_fn=_collate)
    config = RunConfig(epochs=epochs, output_dir=str(tmp_path / name), **overrides)
    summary = fit(DictLossTask(), model, optimizer, None, train, val, config)
    return model, summary


def test_dict_loss_task_trains_and_writes_the_run_folder(tmp_path):
    model, summary = _run(tmp_path, "run")
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"train_loss", "val_loss", "neg_mse", "lr", "seconds", "images_per_s"} <= set(records[0])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert summary["best_neg_mse"] == max(r["neg_mse"] for r in records)
    assert summary["epochs"] == 3 and summary["world_size"] == 1
    assert json.loads((out / "summary.json").read_text())["best_epoch"] == summary["best_epoch"]
    for name in ("last.pt", "last.safetensors", "best.safetensors", "curves.png"):
        assert (out / name).is_file()
    last = load_file(str(out / "last.safetensors"))
    assert torch.equal(last["net.4.weight"], model.state_dict()["net.4.weight"])


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight, _ = _run(tmp_path, "straight", epochs=4)
    _run(tmp_path, "split", epochs=4, stop_after_epoch=2)
    assert len((tmp_path / "split" / "metrics.jsonl").read_text().splitlines()) == 2
    torch.manual_seed(123)  # a different global RNG state: resume must restore the saved one
    resumed, summary = _run(tmp_path, "split", epochs=4, resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [
        r["epoch"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
    ] == [
        1,
        2,
        3,
        4,
    ]
    assert summary["epochs"] == 4


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    def one_epoch(batch, accum):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

        class Task(DictLossTask):
            def train_step(self, m, b):
                images, targets = b
                goal = torch.stack([t["value"] for t in targets])
                return ((m(images).squeeze(1) - goal) ** 2).mean(), len(images)

            def evaluate(self, m, loader):
                return {"neg_mse": 0.0}

        loader = DataLoader(_data(8), batch_size=batch, collate_fn=_collate)
        fit(Task(), model, optimizer, None, loader, None, RunConfig(epochs=1, accum_steps=accum))
        return model[1].weight.detach().clone()

    assert torch.allclose(one_epoch(4, 2), one_epoch(8, 1), atol=1e-6)
    assert not torch.allclose(one_epoch(4, 1), one_epoch(8, 1), atol=1e-6)


def test_ema_is_evaluated_and_its_weights_are_the_ones_saved(tmp_path):
    model, summary = _run(tmp_path, "ema", epochs=2, ema_decay=0.5)
    record = json.loads((tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"ema_val_loss", "ema_neg_mse"} <= set(record)
    assert summary["best_from_ema"] and summary["best_neg_mse"] == max(
        json.loads(line)["ema_neg_mse"]
        for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()
    )
    saved = load_file(str(tmp_path / "ema" / "last.safetensors"))
    assert not torch.equal(saved["net.4.weight"], model.state_dict()["net.4.weight"])  # EMA lags the model


def test_bf16_autocast_runs_on_cpu_and_fp16_needs_cuda(tmp_path):
    _, summary = _run(tmp_path, "bf16", epochs=1, amp="bf16")
    assert summary["epochs"] == 1
    with pytest.raises(ConfigError, match="fp16 AMP needs a CUDA device"):
        amp_dtype("fp16", torch.device("cpu"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_amp_on_cpu_follows_native_bf16(native, monkeypatch, caplog):
    from metaformer.engine import loop
    from metaformer.models import hardware

    monkeypatch.setattr(loop, "native_bf16", lambda device: native)
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": native)
    monkeypatch.setattr(hardware, "_WARNED", set())
    assert amp_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    with caplog.at_level("WARNING"):
        assert amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # asked for: still runs
        amp_dtype("bf16", torch.device("cpu"))
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warned) == (0 if native else 1)  # once per process, one sentence
    if warned:
        assert warned[0].count(". ") == 0 and "--amp off" in warned[0]


def test_diverging_loss_stops_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match="training loss became (nan|inf).*lower --lr"):
        _run(tmp_path, "diverge", epochs=1, lr=1e30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"epochs": 2, "accum_steps": 0}, "accum_steps"),
        ({"epochs": 2, "amp": "fp8"}, "amp must be one of"),
        ({"epochs": 2, "stop_after_epoch": 3}, "stop_after_epoch"),
        ({"epochs": 2, "ema_decay": 1.5}, "ema_decay"),
        ({"epochs": 2, "resume": True}, "resume needs an output_dir"),
    ],
)
def test_run_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**kwargs)


def test_to_device_keeps_nested_structure():
    batch = (torch.zeros(1, 3, 4, 4), [{"boxes": torch.zeros(2, 4), "id": 7}])
    moved = to_device(batch, torch.device("cpu"), channels_last=True)
    assert isinstance(moved, tuple) and isinstance(moved[1], list) and moved[1][0]["id"] == 7
    assert moved[0].is_contiguous(memory_format=torch.channels_last)


def test_layout_defaults_to_channels_last_on_cpu_only():
    assert use_channels_last(None, torch.device("cpu")) is True
    assert use_channels_last(None, torch.device("cuda")) is False
    assert use_channels_last(False, torch.device("cpu")) is False
    assert use_channels_last(True, torch.device("cuda")) is True


class ToyConvTask(DictLossTask):
    """The toy task, but checking the layout of every training batch the loop hands over."""

    def __init__(self):
        self.layouts = set()

    def train_step(self, model, batch):
        self.layouts.add(batch[0].is_contiguous(memory_format=torch.channels_last))
        return super().train_step(model, batch)


@pytest.mark.parametrize("setting, expected", [(None, True), (False, False)])
def test_cpu_training_runs_channels_last_unless_turned_off(tmp_path, setting, expected):
    torch.manual_seed(0)
    model = ToyDetector()
    model.net.insert(0, nn.Conv2d(3, 3, 3, padding=1))
    task = ToyConvTask()
    train = DataLoader(_data(16), batch_size=8, collate_fn=_collate)
    config = RunConfig(epochs=1, channels_last=setting)
    fit(task, model, torch.optim.AdamW(model.parameters()), None, train, None, config)
    assert task.layouts == {expected}
    assert model.net[0].weight.is_contiguous(memory_format=torch.channels_last) is expected


def test_adamw_is_fused_and_steps_like_the_foreach_version():
    torch.manual_seed(0)
    fused_model, plain_model = ToyDetector(), ToyDetector()
    plain_model.load_state_dict(fused_model.state_dict())
    fused = create_optimizer(fused_model, lr=0.01, weight_decay=0.05)
    # timm's groups written out by hand: decay on the conv weights only, none on biases
    decayed = [p for p in plain_model.parameters() if p.ndim > 1]
    kept = [p for p in plain_model.parameters() if p.ndim <= 1]
    groups = [{"params": decayed, "weight_decay": 0.05}, {"params": kept, "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups, lr=0.01, foreach=True)
    assert all(group["fused"] for group in fused.param_groups)
    images = torch.randn(4, 3, 2, 2)
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model.eval()
            model(images).pow(2).mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not create_optimizer(ToyDetector(), opt="sgd", lr=0.1, weight_decay=0).defaults.get("fused")


def test_only_conv_and_linear_weights_decay():
    """timm's no-weight-decay groups on a MetaFormer: norms, biases, layer and res scales, StarReLU's
    scalars and the position embedding keep their values apart from the gradient step."""
    from metaformer import create_model

    model = create_model("metaformer_pppa_s12_224", depths=(1, 1, 1, 1), dims=(8, 8, 8, 32), img_size=64)
    optimizer = create_optimizer(model, lr=0.01, weight_decay=0.05)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    layers = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(decay) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.05 if id(p) in layers else 0.0), name
    assert any(name.endswith("pos_embed") for name, _ in model.named_parameters())
    assert any(name.endswith("layer_scale1.scale") for name, _ in model.named_parameters())


def test_layer_decay_comes_from_the_models_group_matcher_and_the_log_shows_the_heads_lr(tmp_path):
    from timm.scheduler import create_scheduler_v2

    from metaformer import create_model

    torch.manual_seed(0)
    model = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=2)
    optimizer = create_optimizer(model, lr=0.01, weight_decay=0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert scales == [0.5**i for i in range(5, -1, -1)]  # stem, 4 blocks, head
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, warmup_epochs=0)
    images = torch.randn(8, 3, 32, 32)
    data = [(images[i], int(i % 2)) for i in range(8)]

    class Classify(DictLossTask):
        primary_metric = "acc"

        def train_step(self, model, batch):
            x, y = batch
            return nn.functional.cross_entropy(model(x), y), len(x)

        def evaluate(self, model, loader):
            return {"acc": 0.5}

    config = RunConfig(epochs=2, output_dir=str(tmp_path / "run"), channels_last=False)
    fit(Classify(), model, optimizer, scheduler, DataLoader(data, batch_size=4), DataLoader(data), config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["lr"] == pytest.approx(0.01)  # the head's, not the stem's 0.01 * 0.5**5
    assert head_lr(optimizer) == max(g["lr"] for g in optimizer.param_groups)
    stem = next(g for g in optimizer.param_groups if g["lr_scale"] == min(scales))
    assert stem["lr"] == pytest.approx(head_lr(optimizer) * 0.5**5)


def test_layer_decay_needs_a_model_and_a_factor_in_range():
    with pytest.raises(ConfigError, match="group_matcher"):
        create_optimizer(list(ToyDetector().parameters()), lr=0.1, weight_decay=0, layer_decay=0.7)
    from metaformer import create_model

    model = create_model("poolformer_s12", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    with pytest.raises(ConfigError, match=r"layer decay must be in \(0, 1\], got 1.5"):
        create_optimizer(model, lr=0.1, weight_decay=0, layer_decay=1.5)

"""Compiled training: a compiled step is the eager step (loss, gradients, EMA), with and without gradient
checkpointing; the loop compiles after the DDP wrap, never recompiles for evaluation, falls back to eager
after one warning when compiling fails, and records its decision in config.json, through a resume.

Compiled with ``aot_eager``: Dynamo's trace and AOTAutograd's joint forward/backward graph, without
Inductor's C++ build (minutes cold on 2 cores for even a tiny MetaFormer); tests/test_compiling.py runs
Inductor itself once, on one layer.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch._dynamo.backends.common import aot_autograd

from metaformer import compiling, create_model
from metaformer.engine import compile_plan
from metaformer.models.kernels import native_ops

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TINY = {"depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]}


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path / "home"))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "unset-by-test")
    torch._dynamo.reset()
    yield tmp_path / "home"
    torch._dynamo.reset()


class GraphCount:
    """An aot_eager backend that counts the graphs Dynamo hands it (each is one compile)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)


def _assert_near(a: torch.Tensor, b: torch.Tensor, rel: float, scale: float = 0.0) -> None:
    """|a - b| within ``rel`` of a's largest magnitude (or of ``scale``, the largest of all gradients, for
    a gradient that is zero in exact arithmetic, such as the pooling norm's bias: the native kernel gives
    0, torch ops rounding noise): near-zero entries carry no relative precision of their own."""
    assert (a - b).abs().max() <= rel * max(a.abs().max().item(), scale) + 1e-12


@pytest.mark.parametrize(
    "checkpointing,bf16,channels_last",
    [(False, False, False), (True, False, False), (False, True, True), (False, False, True)],
    ids=["plain", "grad-checkpointing", "bf16-channels-last", "channels-last-native-ops"],
)
def test_a_compiled_step_is_the_eager_step(home, monkeypatch, checkpointing, bf16, channels_last):
    """Same loss, same gradients, and after an AdamW step the same weights and EMA weights. Tolerance:
    fp32 with the same ATen kernels, where only AOTAutograd's decompositions reorder some sums (1e-6 of
    the largest gradient seen); under bf16 autocast with channels-last, eager runs the native pooling
    kernel and the compiled graph torch ops, so a few bf16 roundings (2^-8 each) apart: 3e-2."""
    eager = create_model("poolformer_s12", num_classes=3, **TINY).train()
    eager.set_grad_checkpointing(checkpointing)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    # fp32 channels-last: the compiled graph runs the native kernels as custom ops (a 1x1 map is
    # channels-last in either layout, so NCHW models take them in their last stage too)
    if channels_last and not bf16:  # eager through the same kernel, not the route's measured choice
        monkeypatch.setenv("METAFORMER_ROUTE_TRAIN_POOL_MIX", "native")
    native_maps = []
    real_forward = native_ops._forward
    monkeypatch.setattr(
        native_ops, "_forward", lambda x, *a: native_maps.append(x.shape[-2:].numel()) or real_forward(x, *a)
    )
    twin = copy.deepcopy(eager)
    compiled = compiling.compile_module(twin, key="step", backend="aot_eager")
    rel = 3e-2 if bf16 else 1e-4
    results = []
    for model, runner in ((eager, eager), (twin, compiled)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ema = ModelEmaV3(model, decay=0.9)
        torch.manual_seed(1)  # stochastic depth draws the same per-sample masks in both
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = runner(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        ema.update(model, step=1)
        results.append((loss.detach(), grads, ema.module.state_dict()))
    assert compiled.compiled and compiled.failure is None
    expect_native = channels_last and not bf16 and native_ops._kernels_built()
    assert any(hw > 1 for hw in native_maps) == expect_native, native_maps
    _assert_near(results[0][0], results[1][0], rel)
    scale = max(g.abs().max().item() for g in results[0][1])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        _assert_near(a, b, rel, 1e-3 * scale)
    assert any(g.abs().sum() > 0 for g in results[1][1])
    weights_rel = 1e-3 if bf16 else rel  # AdamW's first step is about lr x sign(gradient)
    for key, value in results[0][2].items():
        _assert_near(value.float(), results[1][2][key].float(), weights_rel)
    for key, value in eager.state_dict().items():
        _assert_near(value.float(), twin.state_dict()[key].float(), weights_rel)


def _train(tmp_path, **options):
    from metaformer.tasks.classify.config import TrainConfig
    from metaformer.tasks.classify.train import train_classifier

    config = {
        "output": str(tmp_path / "run"),
        "model_kwargs": TINY,
        "epochs": 2,
        "batch_size": 8,
        "limit_train": 48,
        "limit_val": 16,
        "ema_decay": 0.9,
        "progress": False,
        **options,
    }
    return train_classifier(TrainConfig(**config))


def test_on_compiles_once_for_train_and_eval_records_and_resumes(home, tmp_path, monkeypatch):
    """Two epochs with validation between them (EMA on, channels-last on CPU): one graph, trained
    compiled; config.json and summary.json say so; the record gains the key; a resume with an older
    config.json (no compile fields) and --compile off finishes the run."""
    counter = GraphCount()
    monkeypatch.setattr(compile_plan, "BACKEND", counter)
    summary = _train(tmp_path, compile="on", stop_after_epoch=1)
    decision = summary["compile_decision"]
    assert decision["used"] and decision["reason"] == "--compile on" and decision["compile_seconds"] > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["compile"] == "on" and config["compile_decision"]["used"]
    assert counter.graphs == 1
    # epoch 1 of 2: 6 steps, one compiling and five timed - the machine's record has the key
    (record,) = compile_plan.read_records(home).values()
    assert record.cold_compile_s > 0 and record.compiled_step_s > 0
    del config["compile"], config["compile_decision"]  # a run folder from before --compile
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    summary = _train(tmp_path, compile="off", resume=True)
    assert summary["epochs"] == 2 and summary["compile_decision"]["reason"] == "--compile off"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["compile_decision"]["used"] is False
    assert counter.graphs == 1


def _refuse(gm, example_inputs):
    raise RuntimeError("no C++ compiler found")


def _refuse_backward(gm, example_inputs):
    raise RuntimeError("the backward graph does not build")


@pytest.mark.parametrize(
    "backend,reason",
    [
        (_refuse, "no C++ compiler found"),
        (aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=_refuse_backward), "backward graph"),
    ],
    ids=["forward", "backward"],
)
def test_a_failing_compile_warns_once_and_the_run_finishes_eager(
    home, tmp_path, monkeypatch, warned, backend, reason
):
    monkeypatch.setattr(compile_plan, "BACKEND", backend)
    summary = _train(tmp_path, compile="on", epochs=1)
    assert summary["epochs"] == 1 and summary["last"]["train_loss"] > 0
    decision = summary["compile_decision"]
    assert decision["used"] is False and reason in decision["failure"]
    sentences = [w for w in warned() if "torch.compile" in w]
    assert len(sentences) == 1 and "--compile off" in sentences[0] and reason in sentences[0]


def test_auto_times_eager_steps_and_stays_eager_for_a_short_run(home, tmp_path, monkeypatch):
    counter = GraphCount()
    monkeypatch.setattr(compile_plan, "BACKEND", counter)
    summary = _train(tmp_path, compile="auto", epochs=1)
    decision = summary["compile_decision"]
    assert decision["requested"] == "auto" and not decision["used"] and "steps x" in decision["reason"]
    assert decision["eager_step_s"] > 0 and counter.graphs == 0

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer import create_model
from metaformer.errors import CheckpointError, ConfigError, DataError, UnknownModelError
from metaformer.tasks.classify import (
    EvalConfig,
    PredictConfig,
    TrainConfig,
    evaluate_classifier,
    grad_cam,
    load_classifier,
    predict,
    train_classifier,
)
from metaformer.tasks.classify.train import _build_model
from metaformer.weights import read_metadata, save_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}


def tiny_config(output, **overrides) -> TrainConfig:
    values = {
        "output": str(output),
        "model_kwargs": TINY,
        "epochs": 2,
        "batch_size": 32,
        "limit_train": 128,
        "limit_val": 64,
        "progress": False,
    }
    values.update(overrides)
    return TrainConfig(**values)


# --------------------------------------------------------------------------- config and recipes
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be positive"),
        ("epochs", -3, "epochs must be positive"),
        ("batch_size", 0, "batch_size must be positive"),
        ("lr", -1e-3, "lr must be positive"),
        ("lr", 0.0, "lr must be positive"),
        ("recipe", "huge", "unknown recipe 'huge'"),
        ("drop_path_rate", 1.0, "drop_path_rate"),
    ],
)
def test_bad_training_values_are_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_unknown_model_suggests_close_names():
    with pytest.raises(
        UnknownModelError, match="unknown model 'poolformer_s13'; did you mean .*'poolformer_s12'"
    ):
        TrainConfig(model="poolformer_s13")


def test_default_run_is_s12_on_digits_with_the_small_recipe():
    config = TrainConfig().resolve()
    assert (config.model, config.data, config.recipe, config.img_size) == (
        "poolformer_s12",
        None,
        "small",
        32,
    )
    assert config.hflip == 0.0 and config.mixup == 0.0 and config.auto_augment == "none"


def test_fashion_mnist_defaults_to_its_preset_and_its_trunk_yields_to_model_kwargs():
    config = TrainConfig(data="fashion-mnist").resolve()
    assert (config.recipe, config.img_size, config.batch_size, config.hflip) == (
        "fashion-mnist",
        32,
        128,
        0.5,
    )
    assert config.lr == pytest.approx(4e-3)  # the small recipe's 2e-3 per 64 images
    assert dict(config.model_kwargs) == {"depths": [1, 1, 3, 1], "dims": [32, 64, 128, 256]}
    own = TrainConfig(data="fashion-mnist", model_kwargs={"dims": [64, 128, 320, 512]}).resolve()
    assert dict(own.model_kwargs) == {"dims": [64, 128, 320, 512]}  # not merged: the model's own depths
    assert TrainConfig(data="fashion-mnist", recipe="small").resolve().model_kwargs == {}
    assert TrainConfig(data="fashion-mnist", init_checkpoint="w.safetensors").resolve().recipe == "finetune"
    assert TrainConfig(data="/data/imagenet").resolve().model_kwargs == {}


def test_paper_recipe_scales_lr_with_the_global_batch_and_uses_per_model_settings():
    s12 = TrainConfig(data="/data/imagenet").resolve(world_size=8)
    assert s12.recipe == "paper" and s12.lr == pytest.approx(1e-3)  # 8 x 128 = 1024 -> 1e-3
    assert (s12.weight_decay, s12.warmup_epochs, s12.epochs, s12.label_smoothing) == (0.05, 5, 300, 0.1)
    assert (s12.mixup, s12.cutmix, s12.re_prob, s12.auto_augment) == (0.8, 1.0, 0.25, "rand-m9-mstd0.5-inc1")
    assert (s12.drop_path_rate, s12.crop_pct, s12.img_size) == (0.1, 0.9, 224)
    m36 = TrainConfig(
        model="poolformer_m36", data="/d", batch_size=64, accum_steps=2, lr_base=4e-3, lr_base_batch=4096
    ).resolve(world_size=4)
    assert m36.lr == pytest.approx(4e-3 * 512 / 4096)
    assert (m36.drop_path_rate, m36.crop_pct) == (0.3, 0.95)
    assert TrainConfig(data="/d", lr=5e-4, drop_path_rate=0.0).resolve().lr == 5e-4  # flags win


def test_new_class_count_reinitialises_only_the_classifier(tmp_path):
    source = create_model("poolformer_s12", num_classes=5, **TINY)
    save_weights(source, tmp_path / "five.safetensors", class_names=list("abcde"))
    config = TrainConfig(model_kwargs=TINY, init_checkpoint=str(tmp_path / "five.safetensors")).resolve()
    model = _build_model(config, num_classes=10)
    assert torch.equal(model.stem.conv.weight, source.stem.conv.weight)
    assert torch.equal(model.stages[3].blocks[0].mlp.fc2.weight, source.stages[3].blocks[0].mlp.fc2.weight)
    assert model.head.fc.weight.shape == (10, 64)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("classify") / "run"
    summary = train_classifier(tiny_config(out, epochs=3, limit_train=256, limit_val=None, lr=4e-3))
    return out, summary


def test_short_run_writes_every_output(trained_run):
    out, summary = trained_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"train_loss", "val_loss", "top1", "top5", "lr", "seconds", "images_per_s"} <= set(records[0])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert (
        summary["best_top1"] == max(r["top1"] for r in records) and summary["best_top1"] > 30
    )  # chance is 10
    assert {"best_top1", "best_epoch", "epochs", "world_size", "params", "train_images_per_s"} <= set(summary)
    assert summary["world_size"] == 1 and summary["val_images"] == 360
    config = json.loads((out / "config.json").read_text())
    assert (
        config["recipe"] == "small" and config["lr"] == 4e-3 and config["class_names"] == list("0123456789")
    )
    meta = read_metadata(out / "best.safetensors")
    assert meta["model_name"] == "poolformer_s12" and meta["class_names"] == list("0123456789")
    assert meta["config"]["dims"] == [8, 16, 32, 64]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and len(state["history"]) == 3
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_of_the_last_checkpoint_reproduces_the_logged_accuracy(trained_run, tmp_path):
    out, _ = trained_run
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    result = evaluate_classifier(
        EvalConfig(checkpoint=str(out / "last.safetensors"), confusion_png=str(tmp_path / "cm.png"))
    )
    assert result["images"] == 360
    assert result["top1"] == pytest.approx(last["top1"]) and result["loss"] == pytest.approx(
        last["val_loss"], rel=1e-4
    )
    assert result["images_per_s"] > 0 and (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_every_backend_reproduces_the_logged_accuracy(trained_run, tmp_path, backend):
    out, _ = trained_run
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    result = evaluate_classifier(
        EvalConfig(
            checkpoint=str(out / "last.safetensors"),
            confusion_png=str(tmp_path / "cm.png"),
            backend=backend,
            limit=None,
        )
    )
    assert result["backend"] == backend
    assert result["top1"] == pytest.approx(last["top1"])
    assert result["loss"] == pytest.approx(last["val_loss"], abs=1e-4)


def test_onnxruntime_backend_gives_the_fast_paths_outputs():
    from metaformer.deploy import prepare_for_inference

    model = create_model("poolformer_s12", num_classes=10, **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # layer scales away from 1e-5, so every branch counts
        x = torch.randn(5, 3, 64, 64)
        want = model(x)
        fast, fast_name = prepare_for_inference(model, backend="torch", img_size=(64, 64), batch_size=5)
        ort, ort_name = prepare_for_inference(model, backend="onnxruntime", img_size=(64, 64), batch_size=5)
        assert (fast_name, ort_name) == ("torch", "onnxruntime")
        assert (fast(x) - want).abs().max() < 1e-4
        assert (ort(x) - want).abs().max() < 1e-4
    # its threads block between runs instead of spinning, leaving the cores to the data loader and
    # PyTorch (spinning slowed a PyTorch forward right after a run 1.7x on 2 cores), and it takes
    # PyTorch's thread count
    options = ort.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == torch.get_num_threads()


def test_auto_backend_keeps_the_one_measured_faster(monkeypatch, tmp_path):
    from metaformer.deploy import prepare_for_inference
    from metaformer.deploy.backend_onnxruntime import OnnxRuntimeModel
    from metaformer.models import routes

    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    routes.reset()
    model = create_model("poolformer_s12", num_classes=10, **TINY).eval()
    runner, name = prepare_for_inference(model, backend="auto", img_size=(32, 32), batch_size=4)
    [decision] = [d for d in routes.decisions() if d.route == "backend"]
    assert set(decision.times_ms) == {"torch", "onnxruntime", "openvino"}
    assert name == decision.choice == min(decision.times_ms, key=decision.times_ms.get)
    assert isinstance(runner, OnnxRuntimeModel) == (name == "onnxruntime")
    routes.reset()


def test_backend_misuse_is_one_sentence():
    from metaformer.deploy import prepare_for_inference

    model = create_model("poolformer_s12", num_classes=10, **TINY).eval()
    with pytest.raises(ConfigError, match="backend must be one of auto, torch, onnxruntime, openvino"):
        EvalConfig(checkpoint="x.safetensors", backend="tensorrt")
    with pytest.raises(ConfigError, match="runs in fp32; drop --amp"):
        prepare_for_inference(model, backend="onnxruntime", amp=torch.bfloat16)


def test_predict_names_classes_and_draws_grad_cam(trained_run, tmp_path):
    out, _ = trained_run
    from metaformer.data.embedded import digits_splits

    _, val = digits_splits()
    Image.fromarray(val.images[0]).save(tmp_path / "digit.png")
    Image.fromarray(val.images[1]).save(tmp_path / "other.png")
    results = predict(
        PredictConfig(
            inputs=str(tmp_path / "digit.png"),
            checkpoint=str(out / "best.safetensors"),
            topk=3,
            cam=str(tmp_path / "cam.png"),
        )
    )
    preds = results[0]["predictions"]
    assert len(preds) == 3 and all(p["class"] in list("0123456789") for p in preds)
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert results[0]["cam"]["stage"] == 1  # 32x32 input: the deepest stage at least 4x4
    assert Image.open(tmp_path / "cam.png").size == (224, 224)
    folder = predict(PredictConfig(inputs=str(tmp_path), checkpoint=str(out / "best.safetensors"), topk=1))
    assert sorted(r["path"] for r in folder if "predictions" in r)[0].endswith(
        "cam.png"
    )  # every image listed
    with pytest.raises(ConfigError, match="--cam draws one image"):
        predict(PredictConfig(inputs=str(tmp_path), checkpoint=str(out / "best.safetensors"), cam="x.png"))


def test_grad_cam_highlights_the_evidence():
    """Class 0's logit is the energy of the stage-2 map, class 1's its negative: the class-0 map peaks
    on the bright patch, and the class-1 map (all evidence against it) is zero."""

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = torch.nn.Sequential(
                torch.nn.AvgPool2d(4), torch.nn.AvgPool2d(2), torch.nn.AvgPool2d(2), torch.nn.AvgPool2d(2)
            )

        def forward(self, x):
            energy = (self.stages[:3](x) ** 2).sum(dim=(1, 2, 3))
            return torch.stack([energy, -energy], dim=1)

    image = torch.zeros(3, 64, 64)
    image[:, :16, :16] = 1.0
    heat, stage = grad_cam(Probe(), image, 0)
    assert stage == 2 and heat.shape == (64, 64)  # 64 px: stage 2 is the deepest map at least 4x4
    assert heat.max() == 1.0 and heat[:16, :16].mean() > 0.5 and heat[40:, 40:].max() == 0.0
    against, _ = grad_cam(Probe(), image, 1)
    assert against.max() == 0.0


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight = train_classifier(tiny_config(tmp_path / "straight", epochs=4, limit_val=32))
    train_classifier(tiny_config(tmp_path / "split", epochs=4, limit_val=32, stop_after_epoch=2))
    torch.manual_seed(99)
    np.random.seed(99)
    resumed = train_classifier(tiny_config(tmp_path / "split", epochs=4, limit_val=32, resume=True))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "last.safetensors"))
    b = load_file(str(tmp_path / "split" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["best_top1"] == resumed["best_top1"] and resumed["epochs"] == 4


def test_resume_with_other_options_is_refused(tmp_path):
    train_classifier(tiny_config(tmp_path / "run", epochs=2, stop_after_epoch=1, limit_val=32))
    with pytest.raises(ConfigError, match="lr: run has"):
        train_classifier(tiny_config(tmp_path / "run", epochs=2, limit_val=32, resume=True, lr=0.5))
    with pytest.raises(ConfigError, match="already holds a run"):
        train_classifier(tiny_config(tmp_path / "run", epochs=2, limit_val=32))


def test_sigkill_mid_epoch_then_resume_logs_every_epoch_once(tmp_path):
    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "metaformer",
        "classify",
        "train",
        "--output",
        str(out),
        "--epochs",
        "3",
        "--model-kwargs",
        json.dumps(TINY),
        "--limit-train",
        "256",
        "--limit-val",
        "32",
        "--batch-size",
        "16",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # now inside epoch 2
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = len((out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done_before < 3
    result = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------- checkpoints for eval/predict
def test_timm_layout_imagenet_checkpoint_uses_the_paper_eval_transform(tmp_path):
    from safetensors.torch import save_file

    net = create_model("poolformer_s12", final_norm="pooled")
    save_file(net.state_dict(), str(tmp_path / "timm.safetensors"))  # no metaformer metadata: a foreign file
    with pytest.raises(ConfigError, match="pass --model NAME"):
        load_classifier(str(tmp_path / "timm.safetensors"))
    model, classes, preproc = load_classifier(str(tmp_path / "timm.safetensors"), "poolformer_s12")
    assert len(classes) == 1000 and classes[1] == "n01443537"
    assert preproc["crop_pct"] == 0.9 and tuple(preproc["input_size"]) == (3, 224, 224)


def test_checkpoint_of_another_model_or_class_count_is_refused(trained_run, tmp_path):
    out, _ = trained_run
    with pytest.raises(CheckpointError, match="holds poolformer_s12 weights but --model is poolformer_s24"):
        load_classifier(str(out / "best.safetensors"), "poolformer_s24")
    five = create_model("poolformer_s12", num_classes=5, **TINY)
    save_weights(five, tmp_path / "five.safetensors", class_names=list("abcde"))
    with pytest.raises(CheckpointError, match="5 classes but the embedded digits have 10"):
        evaluate_classifier(EvalConfig(checkpoint=str(tmp_path / "five.safetensors")))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(str(tmp_path / "missing.safetensors"))
    with pytest.raises(DataError, match="does not exist"):
        predict(PredictConfig(inputs=str(tmp_path / "nope.png"), checkpoint=str(out / "best.safetensors")))


def test_eval_takes_a_hub_style_folder(trained_run, tmp_path):
    from metaformer import save_pretrained
    from metaformer.weights import model_from_weights

    out, _ = trained_run
    model = model_from_weights(out / "best.safetensors")
    save_pretrained(model, tmp_path / "folder")
    from_file = evaluate_classifier(EvalConfig(checkpoint=str(out / "best.safetensors"), backend="torch"))
    from_folder = evaluate_classifier(
        EvalConfig(
            checkpoint=str(tmp_path / "folder"), backend="torch", confusion_png=str(tmp_path / "c.png")
        )
    )
    assert from_folder["top1"] == from_file["top1"] and from_folder["images"] == 360


def test_two_runs_in_one_process_train_alike(tmp_path):
    """A fresh interpreter (scikit-learn not yet imported) trains twice: the same metrics both times.
    The first import of scikit-learn used to draw from Python's seeded ``random``, so the first run in
    a process (``ablate --jobs 1``, a notebook) trained differently from every later one."""
    script = f"""
import json, sys
from pathlib import Path
from metaformer.tasks.classify import TrainConfig, train_classifier
runs = []
for name in ("a", "b"):
    out = Path({str(tmp_path)!r}) / name
    train_classifier(TrainConfig(output=str(out), model_kwargs={TINY!r}, epochs=1, batch_size=32,
                                 limit_train=96, limit_val=32, progress=False))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    runs.append({{k: record[k] for k in ("train_loss", "val_loss", "top1")}})
print(json.dumps(runs))
"""
    env = dict(os.environ, METAFORMER_ROUTE_PROBE="0", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = json.loads(done.stdout.strip().splitlines()[-1])
    assert first == second

"""`metaformer classify ...` end to end, and every bad input the issue lists: exit code 1, one sentence
naming the problem, no traceback."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaformer import create_model
from metaformer.cli import main
from metaformer.weights import save_weights

TINY = json.dumps({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]})
TINY_TRAIN = [
    "--model-kwargs",
    TINY,
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--limit-train",
    "64",
    "--limit-val",
    "32",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code, err, *needles):
    assert code == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("metaformer: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _images(folder: Path, count: int, size=(40, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (40 * i, 100, 30)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["classify", "train", "--output", str(out), *TINY_TRAIN]) == 0
    return out


# --------------------------------------------------------------------------- happy paths
def test_train_eval_predict_through_the_cli(tiny_run, tmp_path, capsys):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["world_size"] == 1
    code, out, _ = run_cli(
        capsys,
        "classify",
        "eval",
        "--checkpoint",
        str(tiny_run / "best.safetensors"),
        "--confusion",
        str(tmp_path / "cm.png"),
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and result["images"] == 360 and 0 <= result["top1"] <= result["top5"] <= 100
    assert (tmp_path / "cm.png").is_file()
    Image.new("RGB", (32, 32), (255, 255, 255)).save(tmp_path / "white.png")
    predict = [
        "classify",
        "predict",
        str(tmp_path / "white.png"),
        "--checkpoint",
        str(tiny_run / "best.safetensors"),
    ]
    code, out, _ = run_cli(capsys, *predict, "--topk", "2")
    assert code == 0 and out.startswith(str(tmp_path / "white.png")) and out.count("%") == 2
    code, ort_out, _ = run_cli(capsys, *predict, "--topk", "2", "--backend", "onnxruntime")
    assert code == 0 and ort_out.split()[:2] == out.split()[:2]  # same top class through onnxruntime


def test_fine_tune_with_the_paper_recipe_and_another_class_count(tiny_run, tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "val"):
        _images(data / split / "red", 4)
        _images(data / split / "blue", 4)
    code, out, _ = run_cli(
        capsys,
        "classify",
        "train",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "ft"),
        "--init-checkpoint",
        str(tiny_run / "best.safetensors"),
        "--recipe",
        "paper",
        "--model-kwargs",
        TINY,
        "--img-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--json",
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["num_classes"] == 2 and summary["train_images"] == 8
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["recipe"] == "paper" and config["mixup"] == 0.8 and config["re_prob"] == 0.25
    assert config["lr"] == pytest.approx(1e-3 * 4 / 1024)


def test_weights_start_the_finetune_recipe_on_one_folder_of_class_folders(tiny_run, tmp_path, capsys):
    data = tmp_path / "mine"  # DIR/<class>/*: no train/ or val/
    names = [f"kind{d}" for d in range(10)]  # as many classes as the digits, other ones
    for name in names:
        _images(data / name, 5)
    argv = ["classify", "train", "--data", str(data), "--init-checkpoint", str(tiny_run / "best.safetensors")]
    argv += [
        "--model-kwargs",
        TINY,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--val-split",
        "0.2",
    ]
    argv += ["--warmup-epochs", "0", "--img-size", "32"]
    code, out, err = run_cli(capsys, *argv, "--output", str(tmp_path / "ft"), "--json")
    assert code == 0, err
    assert "re-initialising the classifier" in err  # same count, other classes (metaformer.tasks... logs)
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["recipe"] == "finetune" and config["layer_decay"] == 0.75 and config["val_split"] == 0.2
    assert config["mixup"] == 0 and config["drop_path_rate"] == 0.1 and config["ema_decay"] is None
    summary = json.loads(out)
    assert (summary["train_images"], summary["val_images"]) == (40, 10)  # one of each class's 5 held out
    records = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["lr"] == pytest.approx(0.01)  # the head's lr, not the stem's 0.75**5 of it
    code, out, _ = run_cli(
        capsys, "classify", "eval", "--checkpoint", str(tmp_path / "ft" / "best.safetensors"),
        "--data", str(data), "--val-split", "0.2", "--json",
    )  # fmt: skip
    result = json.loads(out)
    assert code == 0 and result["images"] == 10 and set(result["per_class_top1"]) == set(names)
    assert sum(result["per_class_top1"].values()) / 10 == pytest.approx(result["top1"])


def test_torchrun_two_processes_on_gloo(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "metaformer",
        "classify",
        "train",
        "--output",
        str(out),
        "--device",
        "cpu",
        *TINY_TRAIN,
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["lr"] == pytest.approx(2e-3 * 64 / 64)  # global batch 2 x 32
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes
    assert summary["val_images"] == 32


# --------------------------------------------------------------------------- bad input
def test_missing_data_folder(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "classify", "train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o")
    )
    assert_clean_error(code, err, "nope", "does not exist", "DIR/train/<class>")
    assert not (tmp_path / "o").exists()


def test_folder_without_train_val_class_folders(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    code, _, err = run_cli(
        capsys, "classify", "train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "o")
    )
    assert_clean_error(code, err, "no class folders")
    _images(tmp_path / "data" / "train" / "a", 1)
    code, _, err = run_cli(
        capsys, "classify", "train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "o")
    )
    assert_clean_error(code, err, "too few images to hold 0.1 of each class out")


def test_unknown_model_with_close_matches(capsys):
    code, _, err = run_cli(capsys, "classify", "train", "--model", "poolformer_s13")
    assert_clean_error(code, err, "unknown model 'poolformer_s13'", "did you mean")


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--epochs", "0", "epochs must be positive"),
        ("--epochs", "-2", "epochs must be positive"),
        ("--batch-size", "0", "batch_size must be positive"),
        ("--batch-size", "-8", "batch_size must be positive"),
        ("--lr", "0", "lr must be positive"),
        ("--lr", "-0.1", "lr must be positive"),
    ],
)
def test_zero_or_negative_epochs_batch_size_lr(flag, value, needle, capsys):
    code, _, err = run_cli(capsys, "classify", "train", flag, value)
    assert_clean_error(code, err, needle)


def test_missing_garbage_and_malicious_checkpoints(tmp_path, capsys):
    code, _, err = run_cli(capsys, "classify", "eval", "--checkpoint", str(tmp_path / "missing.pth"))
    assert_clean_error(code, err, "missing.pth", "does not exist")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(256))
    code, _, err = run_cli(
        capsys, "classify", "eval", "--model", "poolformer_s12", "--checkpoint", str(garbage)
    )
    assert_clean_error(code, err, "garbage.pth", "not a PyTorch or safetensors checkpoint")
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(target), "w"))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    code, _, err = run_cli(
        capsys,
        "classify",
        "train",
        "--init-checkpoint",
        str(tmp_path / "evil.pth"),
        "--output",
        str(tmp_path / "o"),
        *TINY_TRAIN,
    )
    assert_clean_error(code, err, "evil.pth", "refuses to run code")
    assert not target.exists()


def test_checkpoint_of_another_model_or_class_count(tiny_run, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "classify",
        "eval",
        "--model",
        "poolformer_s24",
        "--checkpoint",
        str(tiny_run / "best.safetensors"),
    )
    assert_clean_error(code, err, "poolformer_s12 weights but --model is poolformer_s24")
    five = create_model("poolformer_s12", num_classes=5, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    save_weights(five, tmp_path / "five.safetensors", class_names=list("abcde"))
    code, _, err = run_cli(capsys, "classify", "eval", "--checkpoint", str(tmp_path / "five.safetensors"))
    assert_clean_error(code, err, "5 classes but the embedded digits have 10")
    code, _, err = run_cli(
        capsys,
        "classify",
        "train",
        "--init-checkpoint",
        str(tiny_run / "best.safetensors"),
        "--model",
        "poolformer_s24",
        "--output",
        str(tmp_path / "o"),
        "--epochs",
        "1",
    )
    assert_clean_error(code, err, "does not fit poolformer_s24", "pass the matching model name")


def test_data_set_of_only_corrupt_images(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "train" / "a").mkdir(parents=True)
    (data / "train" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "train" / "a" / "y.jpg").write_bytes(b"")
    _images(data / "val" / "a", 1)
    code, _, err = run_cli(capsys, "classify", "train", "--data", str(data), "--output", str(tmp_path / "o"))
    assert_clean_error(code, err, "all 2 image files are unreadable")


def test_a_few_corrupt_images_are_skipped_and_counted_in_the_summary(tmp_path, capsys):
    data = tmp_path / "data"
    for split in ("train", "val"):
        _images(data / split / "a", 4)
        _images(data / split / "b", 4)
    (data / "train" / "a" / "bad.png").write_bytes(b"nope")
    code, out, _ = run_cli(
        capsys,
        "classify",
        "train",
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o"),
        "--recipe",
        "small",
        "--img-size",
        "32",
        "--batch-size",
        "4",
        *TINY_TRAIN[:4],
        "--json",
    )
    assert code == 0 and json.loads(out)["skipped_images"] == {"train": 1, "val": 0}


def test_predict_path_that_does_not_exist(tiny_run, tmp_path, capsys):
    code, _, err = run_cli(
        capsys,
        "classify",
        "predict",
        str(tmp_path / "ghost.png"),
        "--checkpoint",
        str(tiny_run / "best.safetensors"),
    )
    assert_clean_error(code, err, "ghost.png", "does not exist")


def test_unusable_output_folder_and_a_folder_holding_another_run(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "classify", "train", "--output", str(blocker), *TINY_TRAIN)
    assert_clean_error(code, err, str(blocker), "is a file, not a folder")
    code, _, err = run_cli(capsys, "classify", "train", "--output", str(blocker / "sub"), *TINY_TRAIN)
    assert_clean_error(code, err, "cannot create output folder")
    before = (tiny_run / "metrics.jsonl").read_text()
    code, _, err = run_cli(capsys, "classify", "train", "--output", str(tiny_run), *TINY_TRAIN)
    assert_clean_error(code, err, "already holds a run", "--resume", "--overwrite")
    assert (tiny_run / "metrics.jsonl").read_text() == before


def test_python_dash_m_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "metaformer", "classify", "train", "--data", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("metaformer: error: data folder")


def test_fashion_mnist_trains_and_evaluates_from_its_idx_files(tmp_path, capsys):

    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "fm"
    data.mkdir()
    for prefix, n in (("train", 40), ("t10k", 20)):  # random images, every class present: the format only
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", np.arange(n) % 10),
        ):
            raw = np.ascontiguousarray(array, dtype=np.uint8)
            header = bytes([0, 0, 8, raw.ndim]) + b"".join(k.to_bytes(4, "big") for k in raw.shape)
            (data / f"{prefix}-{kind}-ubyte").write_bytes(header + raw.tobytes())  # not gzipped
    argv = ["classify", "train", "--data", f"fashion-mnist:{data}", "--recipe", "small", "--epochs", "1"]
    argv += ["--batch-size", "16"]
    code, out, err = run_cli(
        capsys, *argv, "--model-kwargs", TINY, "--output", str(tmp_path / "run"), "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["train_images"], summary["val_images"], summary["num_classes"]) == (40, 20, 10)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["img_size"] == 32 and config["crop_pct"] == 1.0 and config["num_workers"] == 0
    weights = str(tmp_path / "run" / "last.safetensors")
    code, out, _ = run_cli(
        capsys, "classify", "eval", "--checkpoint", weights, "--data", f"fashion-mnist:{data}"
    )
    assert code == 0 and "per-class top-1:" in out and "Ankle boot" in out and "T-shirt/top" in out

"""Each benchmark script runs end to end with --quick (so it doesn't rot), and its figures have the
properties a bug would change: on random weights (layer scales near 1, where a broken mixer moves the
outputs by O(1), not by the 1e-5 of timm's init) every implementation gives timm's outputs and losses,
and gradient checkpointing's peak memory is below the full one's. Timings are not checked: they are
whatever the machine gives."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metaformer.models.kernels import native_available

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def row(output: str, label: str) -> list[str]:
    lines = [line for line in output.splitlines() if line.startswith(label)]
    assert lines, f"no '{label}' row in:\n{output}"
    return lines[0][len(label) :].split()


@pytest.mark.timeout(300)
def test_inference_benchmark_quick():
    out = run("inference.py")
    assert "weights: random (layer scales near 1)" in out
    for label in (
        "timm (NCHW)",
        "timm channels_last",
        "ours (default)",
        "ours fast path",
        "onnxruntime (folded graph)",
    ):
        assert float(row(out, label)[-1]) <= 1e-5, label  # max relative difference to timm's logits
    if native_available():  # the fast path without its native kernel is a row of its own
        assert float(row(out, "ours fast path, torch ops only")[-1]) <= 1e-5


@pytest.mark.timeout(300)
def test_training_benchmark_quick():
    out = run("training.py")
    assert "weights: random (layer scales near 1)" in out
    labels = ["timm channels_last", "ours (NCHW)", "ours channels_last", "ours default (+ fused AdamW)"]
    labels.append("ours + grad checkpointing")
    if native_available():
        labels.append("ours channels_last, torch ops")
    for label in labels:
        cells = row(out, label)
        loss = float(cells[4])  # the first step's loss, then |its difference to timm's|, then the largest
        assert float(cells[5]) <= 1e-5 * loss and float(cells[6]) <= 1e-5 * loss, label  # over all steps
    found = re.search(r"gradient checkpointing: peak memory (\d+) MiB vs (\d+) MiB", out)
    assert found, out
    checkpointed, full = map(int, found.groups())
    assert checkpointed < 0.9 * full  # 24% less measured at batch 8, 96px


@pytest.mark.timeout(300)
def test_mlp_routes_benchmark_quick():
    out = run("mlp_routes.py")  # it asserts every route's output equals the first's before timing
    assert "whole network, weighted by depth" in out
    for route in ("conv", "gemm") + (("fused",) if native_available() else ()):
        assert re.search(rf"weighted by depth:.*\b{route}\s+[\d.]+", out), route


@pytest.mark.timeout(300)
def test_finetune_benchmark_quick(tmp_path):
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):  # random images, every class present: the format only
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", np.arange(n) % 10),
        ):
            data = np.ascontiguousarray(array, dtype=np.uint8)
            header = bytes([0, 0, 8, data.ndim]) + b"".join(k.to_bytes(4, "big") for k in data.shape)
            (tmp_path / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + data.tobytes()))
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "finetune.py"), "--quick", "--data", f"fashion-mnist:{tmp_path}",
         "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith("machine: ")
    for arm in ("fine-tuned", "scratch"):
        cells = row(out, arm + " ")
        assert float(cells[0]) == 0.001 and 0 <= float(cells[1]) <= 100 and len(cells) == 6  # 2 seeds
    assert "trained in" in out and "(not counted below)" in out
    assert re.search(r"summary: fine-tuned .* (beats|does not beat) the scratch mean", out)


@pytest.mark.timeout(300)
def test_precisions_benchmark_quick(tmp_path):
    """50-80 s on a shared 2-core machine, not 30: its 14 rows include three NNCF quantizations, two
    onnxruntime ones and five exports, each checked, and leaving any out would let that row rot."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "precisions.py"), "--quick"],
        capture_output=True, text=True, timeout=280,
        env=dict(os.environ, OMP_NUM_THREADS="1", METAFORMER_HOME=str(tmp_path / "home")),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "weights: random (layer scales near 1)" in out
    # label -> (rel diff to PyTorch fp32's logits, top-1 agreement %) on the timed batch
    table = {
        line[:44].strip(): (float(line[44:].split()[4]), float(line[44:].split()[5]))
        for line in out.splitlines()
        if line[:5] in ("fp32 ", "bf16 ", "int8 ")
    }
    for label in (
        "fp32 OpenVINO, our export",
        "fp32 OpenVINO, timm export",
        "int8 OpenVINO (NNCF), our export",
        "int8 OpenVINO (NNCF), timm export",
        "int8 onnxruntime (QDQ), our export",
    ):
        assert label in table, f"no '{label}' row in:\n{out}"
    assert any(label.startswith("int8 default") for label in table)
    for label, (diff, agreement) in table.items():
        if label.startswith("fp32"):  # every fp32 backend computes PyTorch's outputs
            assert diff <= 1e-5 and agreement == 100, label
        elif label.startswith("bf16"):  # bf16's 8-bit mantissa: about 1e-2 measured
            assert diff <= 5e-2 and agreement >= 75, label
        else:  # int8 on random weights: the figures depend on the CPU's int8 kernels (not asserted)
            assert diff >= 0 and 0 <= agreement <= 100, label
    assert "the int8 default (auto) runs with min_agreement=0" in " ".join(out.split())


@pytest.mark.timeout(300)
def test_segment_deploy_benchmark_quick():
    out = run("segment_deploy.py")
    assert "weights: random" in out
    for label in ("torch fp32", "onnxruntime fp32", "openvino fp32"):
        if any(line.startswith(label) for line in out.splitlines()):
            diff, agree = row(out, label)[-2:]
            assert float(diff) <= 1e-5 and float(agree) == 100.0, label  # fp32 graphs give PyTorch's maps
    for line in out.splitlines():
        if " bf16 " in f" {line} " and line.split()[0] in ("torch", "openvino"):
            assert float(line.split()[-2]) <= 0.05, line  # within bf16's precision of the largest logit


def test_precisions_benchmark_on_a_trained_checkpoint_applies_the_threshold(tmp_path):
    """--checkpoint: every int8 candidate's held-out agreement, and auto keeps one at or above 99% or
    refuses in one sentence naming each backend (which one depends on the CPU's int8 kernels)."""
    from metaformer.tasks.classify import TrainConfig, train_classifier

    train_classifier(
        TrainConfig(
            output=str(tmp_path / "run"), model_kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]},
            epochs=1, batch_size=32, limit_train=96, limit_val=40, progress=False,
        )
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "precisions.py"), "--threads", "1", "--batch", "8",
         "--repeats", "1", "--checkpoint", str(tmp_path / "run" / "best.safetensors")],
        capture_output=True, text=True, timeout=280,
        env=dict(os.environ, OMP_NUM_THREADS="1", METAFORMER_HOME=str(tmp_path / "home")),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        m.group(1).strip(): float(m.group(2))
        for m in re.finditer(
            r"^((?:onnxruntime QDQ|OpenVINO NNCF)[^\n]*?)\s+([\d.]+)% of 100 ", done.stdout, re.M
        )
    }
    assert len(rows) == 5, done.stdout
    auto = next(line for line in done.stdout.splitlines() if line.startswith("auto at the default threshold"))
    if "refused" in auto:
        assert "openvino" in auto and "onnxruntime" in auto and all(value < 99 for value in rows.values())
    else:
        assert "(99%)" in auto and any(value >= 99 for value in rows.values())

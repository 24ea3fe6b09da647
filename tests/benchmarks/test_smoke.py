"""Each benchmark script runs end to end with --quick (so it doesn't rot), and its figures have the
properties a bug would change: on random weights (layer scales near 1, where a broken mixer moves the
outputs by O(1), not by the 1e-5 of timm's init) every implementation gives timm's outputs and losses,
and gradient checkpointing's peak memory is below the full one's. Timings are not checked: they are
whatever the machine gives."""

import re

import pytest
from smoke_helpers import row, run

from metaformer.models.kernels import native_available


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
    out = run(
        "finetune.py", "--quick", "--data", f"fashion-mnist:{tmp_path}", "--output", str(tmp_path / "out")
    )
    assert out.startswith("machine: ")
    for arm in ("fine-tuned", "scratch"):
        cells = row(out, arm + " ")
        assert float(cells[0]) == 0.001 and 0 <= float(cells[1]) <= 100 and len(cells) == 6  # 2 seeds
    assert "trained in" in out and "(not counted below)" in out
    assert re.search(r"summary: fine-tuned .* (beats|does not beat) the scratch mean", out)

"""The deployment benchmarks run end to end (so they don't rot): every fp32 row gives PyTorch's outputs,
every bf16 row is within bf16's precision of them, and on a trained checkpoint the int8 threshold
decides which candidate ``auto`` keeps. Timings are not checked. A file of their own, so that a
parallel run can put them on another worker than the other benchmark smokes."""

import re

import pytest
from smoke_helpers import row, run


@pytest.mark.timeout(300)
def test_precisions_benchmark_quick(tmp_path):
    """50-80 s on a shared 2-core machine, not 30: its 14 rows include three NNCF quantizations, two
    onnxruntime ones and five exports, each checked, and leaving any out would let that row rot."""
    out = run("precisions.py", "--quick", home=tmp_path / "home", timeout=280)
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
    out = run(
        "precisions.py", "--threads", "1", "--batch", "8", "--repeats", "1",
        "--checkpoint", str(tmp_path / "run" / "best.safetensors"), home=tmp_path / "home", timeout=280,
    )  # fmt: skip
    rows = {
        m.group(1).strip(): float(m.group(2))
        for m in re.finditer(r"^((?:onnxruntime QDQ|OpenVINO NNCF)[^\n]*?)\s+([\d.]+)% of 100 ", out, re.M)
    }
    assert len(rows) == 5, out
    auto = next(line for line in out.splitlines() if line.startswith("auto at the default threshold"))
    if "refused" in auto:
        assert "openvino" in auto and "onnxruntime" in auto and all(value < 99 for value in rows.values())
    else:
        assert "(99%)" in auto and any(value >= 99 for value in rows.values())

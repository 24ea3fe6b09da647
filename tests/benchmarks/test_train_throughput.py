import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


def test_train_throughput_benchmark_quick_run(capsys):
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    losses = out.splitlines()[0].split()
    assert losses[3] == losses[5]  # metaformer and timm agree on the first step's loss (6 decimals)
    assert "ratio metaformer/timm:" in out

"""`metaformer info --system`: the machine, its calibration and every route chosen on it."""

import json

import pytest

from metaformer import cli, system
from metaformer.models import routes


@pytest.fixture
def measuring(monkeypatch, tmp_path):
    monkeypatch.delenv("METAFORMER_ROUTE_PROBE", raising=False)
    monkeypatch.setenv("METAFORMER_HOME", str(tmp_path))
    monkeypatch.setattr(
        system, "calibration", lambda threads=2: {"threads": 2, "fp32_gflops": 240.0, "factor": 2.0}
    )
    routes.reset()
    yield
    routes.reset()


def test_a_probe_decides_the_fast_and_training_routes(measuring):
    system.probe_routes(img_size=64, batch=2)
    made = {d.route for d in routes.decisions()}
    assert {"train_pool_mix", "train_mlp", "fast_pool_mix", "fast_mlp"} <= made


def test_info_system_prints_cpu_isa_bf16_factor_and_routes(measuring, monkeypatch, capsys, tmp_path):
    real = system.probe_routes
    monkeypatch.setattr(system, "probe_routes", lambda: real(img_size=64, batch=2))
    assert cli.main(["info", "--system"]) == 0
    out = capsys.readouterr().out
    labels = ("cpu ", "isa ", "native bf16 ", "calibrate ", "factor 2.00", "train_mlp", "fast_mlp", "compile")
    for label in labels:
        assert label in out
    assert cli.main(["info", "--system", "--json"]) == 0  # routes now known: printed from the cache
    report = json.loads(capsys.readouterr().out)
    assert report["factor"] == 2.0 and isinstance(report["native_bf16"], bool)
    assert report["compile_cache"]["path"] == str(tmp_path / "inductor")
    assert all(r["choice"] in routes.ROUTES[r["route"]] for r in report["routes"])


def test_info_without_a_model_or_system_is_one_sentence(capsys):
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--system" in err and "Traceback" not in err


def test_machine_line_names_cpu_isa_bf16_and_factor(monkeypatch):
    monkeypatch.setattr(
        system, "calibration", lambda threads=2: {"threads": 2, "fp32_gflops": 150.0, "factor": 1.25}
    )
    line = system.machine_line()
    assert (
        line.startswith("machine: ") and "native bf16: " in line and "factor 1.25" in line and "ATen " in line
    )

"""`metaformer models` and `metaformer info`, in-process and through a real subprocess."""

import json
import subprocess
import sys

from metaformer.cli import main


def test_models_lists_params_macs_and_paper_top1(capsys):
    assert main(["models", "poolformer_s1*"]) == 0
    out = capsys.readouterr().out
    assert "poolformer_s12" in out and "11.92" in out and "1.82" in out and "77.2" in out


def test_models_json_is_machine_readable(capsys):
    assert main(["models", "poolformer_s12", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "poolformer_s12" and abs(row["gmacs"] - 1.8227) < 1e-3


def test_models_with_no_match_fails_with_one_line(capsys):
    assert main(["models", "nothing*"]) == 1
    assert "no model matches 'nothing*'" in capsys.readouterr().err


def test_info_reports_stage_shapes_for_non_square_input(capsys):
    assert main(["info", "poolformer_s12", "--img-size", "200", "300", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["output_shape"] for s in info["stages"]] == [
        [64, 50, 75],
        [128, 25, 38],
        [320, 13, 19],
        [512, 7, 10],
    ]
    assert info["params"] == 11_915_176


def test_unknown_model_exits_non_zero_with_close_matches_and_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "metaformer", "info", "poolfomer_s12"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "did you mean 'poolformer_s12'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

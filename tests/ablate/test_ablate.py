"""`metaformer ablate`: study rows, cells that resume and are never re-run, a table read from the runs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from metaformer import ablate
from metaformer.ablate import run_ablation
from metaformer.ablate.report import VariantResult
from metaformer.ablate.study import (
    BASE_MODEL,
    BASELINE,
    STUDIES,
    AblationConfig,
    _check_recipe,
    import_mixer,
    study_variants,
)
from metaformer.cli import main
from metaformer.complexity import count_macs
from metaformer.errors import ConfigError
from metaformer.models import VARIANTS, create_model
from metaformer.models.mixers import MIXERS

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}
TINY_TRAIN = {"limit_train": 32, "limit_val": 16, "batch_size": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    """Training cells with one thread: on a shared 2-core machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _table(report: str) -> dict[str, list[str]]:
    """variant text -> its cells, from ablation.md."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[0] not in ("ablation", "---"):
            rows[cells[1]] = cells
    return rows


def _summary(folder):
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("study", list(STUDIES))
def test_every_study_row_builds_and_runs_at_32px(study):
    for variant in STUDIES[study]:
        model = create_model(BASE_MODEL, num_classes=10, img_size=32, **TINY, **variant.overrides)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10), variant.name
        assert variant.paper_top1 is not None and variant.paper_params_m is not None


def test_study_rows_are_the_papers_table5_changes():
    rows = {v.name: v for v in study_variants("all")}
    assert len(rows) == 1 + 3 + 3 + 3 + 2 + 2 + 4  # one shared baseline, then each study's changes
    assert rows["random"].overrides == {"mixers": ("random",) * 4}
    assert rows["dwconv"].overrides == {"mixers": ("dwconv",) * 4}
    assert rows["pool7"].overrides == {"mixer_kwargs": {"pool_size": 7}}
    assert rows["nonorm"].overrides == {"norms": ("none",) * 4} and rows["nonorm"].paper_top1 == 46.1
    hybrid = VARIANTS["metaformer_ppaa_s12_224"].config  # attention hybrids also switch to LayerNorm
    assert rows["ppaa"].overrides["norms"] == hybrid.norms and rows["ppaa"].paper_top1 == 81.0
    model = create_model(BASE_MODEL, img_size=32, **TINY, **rows["pppa"].overrides)
    assert type(model.stages[3].blocks[0].token_mixer).__name__ == "Attention"
    assert model.stages[3].pos_embed is not None and model.stages[2].pos_embed is None


def test_variant_result_reports_sample_std_over_seeds():
    result = VariantResult(BASELINE, (90.0, 92.0), 1, 1, None, (32, 32))
    assert result.mean == 91.0 and result.std == pytest.approx(2**0.5)
    assert VariantResult(BASELINE, (90.0,), 1, 1, None, None).std is None


def test_study_completes_resumes_without_rerunning_and_reports_the_runs_numbers(tmp_path, monkeypatch):
    config = AblationConfig(
        study="activation", only=("baseline", "relu"), output=str(tmp_path), epochs=2, seeds=2,
        train_options=TINY_TRAIN, **TINY,
    )  # fmt: skip
    real_run_cell = ablate.run_cell
    calls: list[str] = []

    def killed_in_third_cell(payload):
        calls.append(payload["folder"])
        if len(calls) == 3:  # the third cell stops after its first epoch, then the study is interrupted
            real_run_cell({**payload, "train_options": {**payload["train_options"], "stop_after_epoch": 1}})
            raise KeyboardInterrupt
        return real_run_cell(payload)

    monkeypatch.setattr(ablate, "run_cell", killed_in_third_cell)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(config)
    runs = tmp_path / "runs"
    finished = [runs / "baseline" / "seed0", runs / "baseline" / "seed1"]
    stamps = [(f / "summary.json").stat().st_mtime_ns for f in finished]
    assert _summary(runs / "relu" / "seed0")["epochs"] == 1  # half-trained
    first_epoch = (runs / "relu" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert not (runs / "relu" / "seed1").exists()

    calls.clear()
    monkeypatch.setattr(
        ablate, "run_cell", lambda payload: calls.append(payload["folder"]) or real_run_cell(payload)
    )
    result = run_ablation(config)
    assert result.trained == ("relu/seed0", "relu/seed1")
    assert result.skipped == ("baseline/seed0", "baseline/seed1")
    assert calls == [str(runs / "relu" / "seed0"), str(runs / "relu" / "seed1")]
    assert [(f / "summary.json").stat().st_mtime_ns for f in finished] == stamps  # never re-run
    resumed = runs / "relu" / "seed0"
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert lines[:1] == first_epoch  # epoch 1 (with its measured seconds) kept: resumed, not restarted

    calls.clear()
    assert run_ablation(config).trained == () and calls == []

    # every number in the table is the runs' own: top-1 and params from summary.json, MACs from cell.json
    rows = _table((tmp_path / "ablation.md").read_text())
    relu = rows["GELU -> ReLU"]
    top1 = [_summary(runs / "relu" / f"seed{s}")["last"]["top1"] for s in (0, 1)]
    assert relu[2] == f"{np.mean(top1):.2f} ± {np.std(top1, ddof=1):.2f}" and relu[3] == "2/2"
    assert relu[4] == f"{_summary(resumed)['params'] / 1e6:.3f}"
    macs = count_macs(create_model(BASE_MODEL, num_classes=10, img_size=32, act="relu", **TINY), 32)
    assert relu[5] == f"{macs / 1e6:.2f}" and relu[9] == "76.4"
    edited = _summary(runs / "relu" / "seed1")
    edited["last"]["top1"] = 12.5
    (runs / "relu" / "seed1" / "summary.json").write_text(json.dumps(edited))
    run_ablation(config)
    relu = _table((tmp_path / "ablation.md").read_text())["GELU -> ReLU"]
    assert relu[2] == f"{np.mean([top1[0], 12.5]):.2f} ± {np.std([top1[0], 12.5], ddof=1):.2f}"
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_a_study_with_another_recipe_is_refused(tmp_path):
    first = AblationConfig(output=str(tmp_path), epochs=3)
    _check_recipe(tmp_path, first.recipe())
    with pytest.raises(ConfigError, match="another recipe .*epochs"):
        run_ablation(AblationConfig(output=str(tmp_path), epochs=4))


SHIFT_MODULE = """
import torch
from torch import nn


class ShiftMixer(nn.Module):
    wants_tokens = False
    fixed_grid = False

    def __init__(self, dim, **kwargs):
        super().__init__()

    def forward(self, x):
        return torch.roll(x, 1, dims=-1) - x
"""


@pytest.fixture
def user_mixer_module(tmp_path, monkeypatch):
    (tmp_path / "ablate_user_mixers.py").write_text(SHIFT_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield "ablate_user_mixers"
    MIXERS.pop("shift", None)
    sys.modules.pop("ablate_user_mixers", None)


def _image_folder(root, per_class=8):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for label, value in (("dark", 40), ("light", 210)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(value + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_cli_trains_a_user_mixer_from_an_import_path_in_parallel_jobs(tmp_path, user_mixer_module, capsys):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "study"
    argv = [
        "ablate", "--study", "mixers", "--only", "baseline", "shift", "--seeds", "1", "--epochs", "1",
        "--mixer", f"shift={user_mixer_module}:ShiftMixer", "--jobs", "2", "--data", str(data),
        "--img-size", "32", "--recipe", "small", "--batch-size", "8", "--output", str(out),
        "--depths", "1", "1", "1", "1", "--dims", "8", "16", "32", "64",
    ]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "2 cells in 2 processes" in captured.err
    rows = _table(captured.out)
    assert (
        rows["pooling -> shift (user)"][3] == "1/1"
        and rows["PoolFormer-S12 (pooling 3, MLN, GELU)"][3] == "1/1"
    )
    config = json.loads((out / "runs" / "shift" / "seed0" / "config.json").read_text())
    assert config["model_kwargs"]["mixers"] == ["shift"] * 4 and config["img_size"] == 32
    assert main(argv) == 0 and "(0 cells trained, 2 already done)" in capsys.readouterr().out


def test_import_mixer_checks_the_spec(tmp_path, user_mixer_module):
    for spec, message in [
        ("shift", "is not NAME=module.path:Class"),
        ("shift=nowhere_such_module:X", "cannot import 'nowhere_such_module'"),
        (f"shift={user_mixer_module}:Missing", "has no 'Missing'"),
        (f"shift={user_mixer_module}:torch", "not a torch.nn.Module class"),
    ]:
        with pytest.raises(ConfigError, match=message):
            import_mixer(spec)
    assert import_mixer(f"shift={user_mixer_module}:ShiftMixer") == "shift" and "shift" in MIXERS
    with pytest.raises(ConfigError, match="joins the token-mixer study"):
        study_variants("norm", extra_mixers=("shift",))
    with pytest.raises(ConfigError, match="has no variant 'pool4'"):
        study_variants("pool-size", only=("pool4",))


def test_cli_bad_mixer_spec_exits_1_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "metaformer", "ablate", "--mixer", "oops", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "--mixer 'oops' is not NAME=module.path:Class" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_local_mixer_class_with_parallel_jobs_is_refused_before_training(tmp_path):
    class LocalMixer(torch.nn.Module):  # not importable by a worker process
        def forward(self, x):
            return x

    MIXERS["local_test"] = LocalMixer
    try:
        config = AblationConfig(
            output=str(tmp_path), only=("local_test",), extra_mixers=("local_test",), jobs=2
        )
        with pytest.raises(ConfigError, match="'local_test' .* cannot be sent to worker processes"):
            run_ablation(config)
    finally:
        MIXERS.pop("local_test")
    assert not (tmp_path / "runs").exists()


def test_compile_reaches_every_cell_but_not_the_recipe(tmp_path):
    """--compile changes speed, not results: each cell's training gets it, and a study started with
    another --compile still counts its finished cells (the recipe does not name it)."""
    from metaformer.ablate import AblateOptions, _cell_payload
    from metaformer.ablate.study import plan_cells

    config = AblateOptions(compile="on", output=str(tmp_path)).to_config()
    assert config.compile == "on"
    cell = plan_cells(config)[0]
    assert _cell_payload(cell, config)["compile"] == "on"
    eager = AblateOptions(compile="off", output=str(tmp_path)).to_config()
    assert eager.recipe() == config.recipe()
    with pytest.raises(ConfigError, match="compile"):
        AblateOptions(compile="sometimes").to_config()

"""The paper's Table 5 "other" rows (no residual connection, no channel MLP), `ablate --list`, and the
report citing the paper's table."""

import json

import pytest
import torch

from metaformer.ablate import run_ablation
from metaformer.ablate.study import BASE_MODEL, STUDIES, AblationConfig
from metaformer.cli import main
from metaformer.complexity import count_macs, count_params
from metaformer.models import create_model

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


@pytest.mark.parametrize("name", ["noresidual", "nomlp"])
def test_other_rows_params_and_macs_match_the_paper(name):
    """The full S12 with each row's overrides, counted on the meta device as `metaformer models` is."""
    (variant,) = [v for v in STUDIES["other"] if v.name == name]
    with torch.device("meta"):
        model = create_model(BASE_MODEL, **variant.overrides)
    assert count_params(model) / 1e6 == pytest.approx(variant.paper_params_m, abs=0.05)  # paper: 0.1 M digits
    assert count_macs(model, 224) / 1e9 == pytest.approx(variant.paper_gmacs, abs=0.05)


def test_no_residual_block_output_is_its_branches_alone():
    model = create_model(BASE_MODEL, residual=False, layer_scale_init=None, **TINY).eval()
    block = model.stages[0].blocks[0]
    x = torch.randn(1, 8, 8, 8)
    half = block.token_mixer(block.norm1(x))
    assert torch.allclose(block(x), block.mlp(block.norm2(half)), atol=1e-6)


def test_no_channel_mlp_block_is_its_mixer_half_alone():
    model = create_model(BASE_MODEL, mlp_ratio=0, **TINY).eval()
    block = model.stages[0].blocks[0]
    assert not hasattr(block, "mlp") and not hasattr(block, "norm2")
    x = torch.randn(1, 8, 8, 8)
    expected = x + block.layer_scale1(block.token_mixer(block.norm1(x)))
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_other_rows_train_and_report_as_a_study(tmp_path):
    config = AblationConfig(
        study="other", output=str(tmp_path), epochs=1, seeds=1,
        train_options={"limit_train": 32, "limit_val": 16, "batch_size": 16}, **TINY,
    )  # fmt: skip
    result = run_ablation(config)
    report = result.report.read_text()
    assert "residual connection -> none" in report and "channel MLP -> none" in report
    assert "Table 5 of Yu et al." in report and "PAPER.md" not in report
    nomlp = json.loads((tmp_path / "runs" / "nomlp" / "seed0" / "cell.json").read_text())
    tiny_nomlp = create_model(BASE_MODEL, num_classes=10, img_size=32, mlp_ratio=0, **TINY)
    assert nomlp["macs"] == count_macs(tiny_nomlp, 32)


def test_list_names_every_study_and_the_variants_only_takes(capsys):
    assert main(["ablate", "--list"]) == 0
    out = capsys.readouterr().out
    for study, variants in STUDIES.items():
        for variant in variants:
            assert any(line.split()[:2] == [study, variant.name] for line in out.splitlines())
    assert main(["ablate", "--list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)["studies"]
    assert [row["variant"] for row in listing["other"]] == ["baseline", "noresidual", "nomlp"]


def test_only_takes_a_listed_variant_name(tmp_path):
    assert main(["ablate", "--study", "other", "--only", "nomlp", "--print-config"]) == 0
    assert main(["ablate", "--study", "other", "--only", "nomlpp", "--output", str(tmp_path)]) == 1

"""A CLI that answers at once: `--help`, `--version` and `models` import no task module and build no
model; the one-line summaries `--help` shows stay equal to what each task module declares."""

import argparse
import json
import subprocess
import sys

import pytest

from metaformer import __version__, cli, tasks


def _run_and_list_modules(*argv: str) -> tuple[str, set[str]]:
    code = (
        "import sys, json; from metaformer.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, check=True
    )
    *out, modules = proc.stdout.strip().splitlines()
    return "\n".join(out), set(json.loads(modules))


def _heavy(modules: set[str]) -> list[str]:
    task_modules = set(tasks.COMMAND_MODULES.values())
    return sorted(
        m
        for m in modules
        if m in task_modules
        or m.startswith(("metaformer.tasks.", "metaformer.ablate.", "timm", "torchvision"))
    )


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_top_level_help_imports_no_task_module(argv):
    out, modules = _run_and_list_modules(*argv)
    assert _heavy(modules) == []
    if argv == ["--help"]:
        assert all(word in out for word in tasks.COMMAND_HELP)


def test_models_builds_no_model_and_imports_no_task_module():
    out, modules = _run_and_list_modules("models")
    assert _heavy(modules) == [] and "metaformer.model_counts" in modules
    assert "poolformer_s12" in out and "caformer_b36" in out


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"metaformer {__version__}"


def _top_level_help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in sub._choices_actions}


def test_the_summary_help_lines_equal_the_task_modules_own():
    assert _top_level_help_lines(cli.build_parser(summary=True)) == _top_level_help_lines(cli.build_parser())
    assert cli.build_parser(summary=True).format_help() == cli.build_parser().format_help()


def test_predict_and_info_name_explain_themselves():
    parser = cli.build_parser("classify")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    classify = sub.choices["classify"]
    actions = next(a for a in classify._actions if isinstance(a, argparse._SubParsersAction))
    assert actions.choices["predict"].description
    info = sub.choices["info"]
    name = next(a for a in info._actions if a.dest == "name")
    assert name.help and "model" in name.help


def test_info_at_another_size_gives_that_size_top1_not_the_224_one(capsys):
    assert cli.main(["info", "caformer_s18", "--img-size", "384"]) == 0
    out = capsys.readouterr().out
    from metaformer.models import get_variant

    assert "paper ImageNet-1K top-1" not in out
    assert f": {get_variant('caformer_s18').paper_top1} " not in out
    assert "ImageNet-1K top-1 at 384x384: 85.0 (caformer_s18.sail_in1k_384)" in out


def test_info_at_a_size_without_weights_says_none(capsys):
    assert cli.main(["info", "poolformer_s12", "--img-size", "256", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["paper_top1"] is None and info["weights_top1"] == {}
    assert cli.main(["info", "poolformer_s12", "--img-size", "256"]) == 0
    assert "none reported" in capsys.readouterr().out

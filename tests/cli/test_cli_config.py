"""The CLI generated from the config dataclasses: every flag of the hand-written CLI it replaced still
parses with the same name and meaning, ``--config FILE`` (a run's own config.json included) with flags
over it, ``--print-config``, config-file errors in one sentence, and a new task in one module."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from metaformer import cli, tasks
from metaformer.engine import skeleton
from metaformer.engine.skeleton import TrainingParts, TrainingSpec
from metaformer.options import AT_LEAST_1, RunOptions, option
from metaformer.tasks import TaskCommands, command

GOLDEN = Path(__file__).parent
# dest in the old parser -> config field, where they differ
FIELD = {"workers": "num_workers", "confusion": "confusion_png", "no_verify_images": "verify_images"}
NEGATED = {"--no-verify-images", "--no-fold"}  # store_true of a "no_" dest then, store_false of the field now


def _flags(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_flags(sub, (*path, name)))
        elif action.option_strings:
            key = (
                "/".join(action.option_strings)
                if len(action.option_strings) > 1
                else action.option_strings[0]
            )
            found.setdefault(" ".join(path), {})[key] = action
            for spelling in action.option_strings:  # a flag that gained another spelling still parses
                found[" ".join(path)].setdefault(spelling, action)
    return found


def test_every_flag_from_before_the_generated_cli_still_parses_the_same() -> None:
    before = json.loads((GOLDEN / "cli_flags.json").read_text())
    now = _flags(cli.build_parser())

    def kind(name: str | None) -> str | None:
        return None if name == "str" else name  # argparse's default type is str

    for name, flags in before.items():
        for flag, old in flags.items():
            assert flag in now[name], f"{name} lost {flag}"
            new = now[name][flag]
            assert new.nargs == old["nargs"], (name, flag)
            if old["choices"] is None:  # a new choice (a recipe) may join; an old one never goes
                assert not new.choices, (name, flag)
            else:
                assert set(old["choices"]) <= set(new.choices or ()), (name, flag)
            assert kind(getattr(new.type, "__name__", None)) == kind(old["type"]), (name, flag)
            if flag in NEGATED:
                assert old["kind"] == "_StoreTrueAction" and type(new).__name__ == "_StoreFalseAction"
                assert new.dest == FIELD.get(old["dest"], old["dest"].removeprefix("no_"))
            else:
                stores_alike = old["kind"] == "_StoreAction" and isinstance(new, argparse._StoreAction)
                assert type(new).__name__ == old["kind"] or stores_alike, (name, flag)  # a checking store
                assert new.dest == FIELD.get(old["dest"], old["dest"]), (name, flag)


def test_help_texts_are_those_of_before() -> None:
    """Every command's description and every flag's help and metavar, as the hand-written CLI had them."""
    before = json.loads((GOLDEN / "cli_help.json").read_text())
    changed = {"ablate --dims", "export name"}  # %(default)s written out; the positional is now `model`
    # Fashion-MNIST, the one-folder hold-out and the finetune recipe joined these (issue 24)
    changed |= {"ablate --data", "ablate --img-size", "classify train --data", "classify train --recipe"}
    changed |= {"classify eval --data", "classify train --workers"}
    # OpenVINO and the precisions (issue 23), then compile (issue 34), joined the backend choice
    changed |= {"classify eval --backend", "classify predict --backend"}
    changed |= {"export :help", "export --format", "export --dynamic-batch"}
    # the "other" study, eval's recorded data, recipes by data size, and help that was missing (issue 33)
    changed |= {"ablate :help", "classify eval --checkpoint", "classify eval :description", "info name"}
    changed |= {"classify predict --checkpoint", "classify predict :description", "models --markdown"}
    changed |= {"classify train --hflip", "classify train --min-lr", "classify train --warmup-lr"}
    changed |= {"classify train :description", "detect train --backbone-checkpoint"}
    changed |= {"segment train --backbone-checkpoint"}  # now also spelled --init-checkpoint
    # export writes a folder, at the checkpoint's recorded size by default (issue 31)
    changed |= {"export -o/--output", "export --output/-o", "export --img-size"}
    now: dict[str, Any] = {}

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        now[" ".join(path) + " :description"] = parser.description
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    now[" ".join([*path, choice.dest]) + " :help"] = choice.help
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            else:
                key = " ".join(path) + " " + "/".join(action.option_strings or [action.dest])
                now[key] = [action.help, str(action.metavar)]

    walk(cli.build_parser(), [])
    for key, value in before.items():
        if key not in changed:
            assert now.get(key) == value, key


def _metrics(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")} for line in lines
    ]


def _train(*argv: str) -> None:
    """One ``metaformer`` process per run: a run in a fresh process is what a re-run is (in one process,
    the first run's lazy ``sklearn.datasets`` import draws from Python's ``random`` after seeding)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "metaformer", *argv], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_runs_config_json_is_a_config_file_that_reproduces_the_run(tmp_path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    flags = ["--epochs", "2", "--limit-train", "128", "--limit-val", "64", "--batch-size", "32"]
    flags += ["--model-kwargs", '{"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}']  # the file must carry it
    _train("classify", "train", *flags, "--output", str(first))
    config = first / "config.json"
    _train("classify", "train", "--config", str(config), "--output", str(again))
    assert len(_metrics(first)) == 2
    assert _metrics(again) == _metrics(first)
    measured = ("output", "compile_decision")  # the folder, and --compile auto's timed eager steps
    recorded = {k: v for k, v in json.loads(config.read_text()).items() if k not in measured}
    assert {
        k: v for k, v in json.loads((again / "config.json").read_text()).items() if k not in measured
    } == recorded


def test_flags_win_over_the_config_file_and_print_config_writes_nothing(tmp_path, capsys) -> None:
    file = tmp_path / "recipe.yaml"
    file.write_text("epochs: 7\nbatch_size: 16\nscale: [0.5, 1.0]\nmodel_kwargs: {depths: [1, 1, 1, 1]}\n")
    out = tmp_path / "run"
    argv = [
        "classify",
        "train",
        "--config",
        str(file),
        "--epochs",
        "3",
        "--output",
        str(out),
        "--print-config",
    ]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs"] == 3  # the flag
    assert printed["batch_size"] == 16 and printed["scale"] == [0.5, 1.0]  # the file
    assert printed["model_kwargs"] == {"depths": [1, 1, 1, 1]}
    assert printed["recipe"] == "small" and printed["lr"] == pytest.approx(2e-3 * 16 / 64)  # resolved
    assert not out.exists()


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_dense_train_and_eval_take_config_files(tmp_path, capsys, task) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"epochs": 2, "fpn_channels": 32, "seed": 5}))
    assert cli.main([task, "train", "--config", str(file), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["epochs"], printed["fpn_channels"], printed["seed"]) == (2, 32, 5)
    file.write_text(json.dumps({"checkpoint": "w.safetensors", "limit": 3}))
    assert cli.main([task, "eval", "--config", str(file), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["limit"] == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["classify", "train"],
        ["classify", "eval", "--checkpoint", "w.safetensors"],
        ["classify", "predict", "img.png", "--checkpoint", "w.safetensors"],
        ["detect", "train"],
        ["detect", "eval", "--checkpoint", "w.safetensors"],
        ["detect", "predict", "img.png", "--checkpoint", "w.safetensors"],
        ["segment", "train"],
        ["segment", "eval", "--checkpoint", "w.safetensors"],
        ["segment", "predict", "img.png", "--checkpoint", "w.safetensors"],
        ["ablate"],
        ["export", "poolformer_s12", "--output", "m.onnx", "--random-init"],
    ],
)
def test_every_generated_command_prints_its_config_and_runs_nothing(
    tmp_path, capsys, argv, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert isinstance(printed, dict) and printed
    assert list(tmp_path.iterdir()) == []  # no run folder, no output file


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        (None, ".json", "does not exist; pass a JSON or YAML file"),
        ("{epochs: [", ".yaml", "is not valid JSON or YAML"),
        ("{'epochs': 2", ".json", "is not valid JSON or YAML"),
        ("- 1\n- 2\n", ".yaml", "must hold a mapping of field names to values, not a list"),
        (
            '{"epoch": 2}',
            ".json",
            "sets 'epoch', which `metaformer classify train` does not take (did you mean",
        ),
        ('{"epochs": 0}', ".json", "epochs must be positive, got 0"),
        ('{"model_kwargs": "[1]"}', ".json", "--model-kwargs must be a JSON object"),
        ("model_kwargs: [1, 2]\n", ".yaml", "--model-kwargs must be a JSON object"),
        ('{"resume": "yes"}', ".json", "resume must be true or false, got 'yes'"),
    ],
)
def test_bad_config_files_fail_in_one_sentence(tmp_path, capsys, text, suffix, message) -> None:
    file = tmp_path / f"c{suffix}"
    if text is not None:
        file.write_text(text)
    assert cli.main(["classify", "train", "--config", str(file)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- a new task in one module
@dataclasses.dataclass(frozen=True)
class ToyConfig(RunOptions):
    """A toy task: tell which half of a Gaussian a sample came from, with a linear layer."""

    TASK: ClassVar[str] = "toy"
    RECIPES: ClassVar[dict[str, dict[str, Any]]] = {
        "shapes": {"epochs": 2, "batch_size": 16, "lr": 0.5, "weight_decay": 0.0}
    }

    width: int = option(4, "features per sample", metavar="N", check=AT_LEAST_1)

    def resolve(self, world_size: int = 1) -> ToyConfig:
        values = self.recipe_values(("epochs", "batch_size", "lr", "weight_decay"))
        return dataclasses.replace(self, recipe=self.recipe_name, num_workers=self.num_workers or 0, **values)


class ToyTask:
    primary_metric = "accuracy"

    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        x, y = batch
        return F.cross_entropy(model(x), y), len(y)

    def evaluate(self, model: nn.Module, loader: Any) -> dict[str, float]:
        right = total = 0
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
        return {"accuracy": right / max(total, 1)}

    def save_weights(self, model: nn.Module, path: Path) -> None:
        from metaformer.weights import atomic_write

        with atomic_write(path) as tmp:
            torch.save(model.state_dict(), tmp)


def _toy_data(width: int, n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    return TensorDataset(torch.randn(n, width, generator=gen) + 2 * y[:, None] - 1, y)


def _build(config: ToyConfig, info: Any) -> TrainingParts:
    train, val = _toy_data(config.width, 256, 0), _toy_data(config.width, 64, 1)
    loaders = skeleton.data_loaders(config, train, val, info)
    model = nn.Linear(config.width, 2).to(info.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    return TrainingParts(ToyTask(), model, optimizer, None, *loaders, f"toy width {config.width}")


@command("train", ToyConfig, "train the toy task")
def train_toy(config: ToyConfig) -> dict[str, Any]:
    finish = lambda config, summary, parts: f"accuracy {summary['best_accuracy']:.2f}"  # noqa: E731
    return skeleton.train(config, TrainingSpec("toy", _build, finish, "generated:noise"))


def train_report(summary: dict[str, Any]) -> str:
    return f"toy accuracy {summary['best_accuracy']:.2f}; run folder {summary['output']}"


COMMANDS = TaskCommands(__name__, "toy", "a toy task", "A task that exists only in the tests.")


@pytest.fixture
def toy_registered():
    tasks.register_task(__name__)
    yield
    tasks.TASK_MODULES.remove(__name__)


def test_a_new_task_is_one_module_and_one_registration(tmp_path, capsys, toy_registered, one_thread) -> None:
    text = cli.build_parser().format_help()
    assert "toy" in text
    assert cli.main(["toy", "train", "--width", "0"]) == 1  # argparse takes 0; the config refuses it
    assert "width must be at least 1" in capsys.readouterr().err
    out = tmp_path / "toy"
    assert cli.main(["toy", "train", "--width", "3", "--output", str(out), "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("toy accuracy 0.")
    record = json.loads((out / "config.json").read_text())
    assert record["width"] == 3 and record["recipe"] == "shapes" and record["epochs"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "toy" and summary["best_accuracy"] > 0.8  # chance is 0.5, the Bayes rate 0.96
    again = tmp_path / "again"
    assert cli.main(["toy", "train", "--config", str(out / "config.json"), "--output", str(again)]) == 0
    assert _metrics(again) == _metrics(out)

"""What `classify` picks when the user leaves it out: eval's data (the run's own, from config.json beside
the checkpoint) and train's recipe (from the data's size), each said on the first line."""

import json
from pathlib import Path

import pytest
from PIL import Image

from metaformer.cli import main
from metaformer.data.images import count_images
from metaformer.tasks.classify import TrainConfig
from metaformer.tasks.classify import config as classify_config

TINY = json.dumps({"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]})
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _class_folders(root: Path, classes: dict[str, int]) -> Path:
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (36, 36), (120 * c, 10 * i, 60)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _fresh_counts():
    classify_config._training_images.cache_clear()
    yield
    classify_config._training_images.cache_clear()


def test_eval_without_data_evaluates_a_two_class_run_on_the_part_it_held_out(tmp_path, capsys):
    data = _class_folders(tmp_path / "pets", {"cat": 10, "dog": 10})
    run = tmp_path / "run"
    train = ["classify", "train", "--data", str(data), "--val-split", "0.2", "--model-kwargs", TINY]
    train += ["--epochs", "1", "--batch-size", "8", "--img-size", "32", "--output", str(run)]
    assert main(train) == 0
    capsys.readouterr()
    assert main(["classify", "eval", "--checkpoint", str(run / "best.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 4  # the 2 + 2 images training held out, not the digits' 360
    assert str(data) in result["data"] and "config.json" in result["data"]
    assert set(result["per_class_top1"]) == {"cat", "dog"}
    assert main(["classify", "eval", "--checkpoint", str(run / "best.safetensors")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert str(data) in first and "held-out 0.2" in first


def test_eval_names_the_recorded_data_when_it_is_gone(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": str(tmp_path / "moved"), "val_split": 0.1}))
    from metaformer import create_model, save_weights

    model = create_model("poolformer_s12", num_classes=2, **json.loads(TINY))
    save_weights(model, run / "best.safetensors", class_names=["cat", "dog"])
    assert main(["classify", "eval", "--checkpoint", str(run / "best.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("metaformer: error:") == 1 and "Traceback" not in err
    assert "moved" in err and "config.json" in err and "--data" in err


def test_a_small_folder_trains_with_the_small_recipe_and_flips(tmp_path):
    data = _class_folders(tmp_path / "few", {"a": 3, "b": 3})
    config = TrainConfig(data=str(data))
    recipe, why = config.recipe_choice()
    assert recipe == "small" and "5 training images" in why  # 6 images, a tenth held out
    resolved = config.resolve()
    assert (resolved.recipe, resolved.hflip, resolved.epochs) == ("small", 0.5, 12)
    assert TrainConfig(data=str(data), hflip=0.0).resolve().hflip == 0.0  # a flag still wins


def test_a_folder_at_the_bound_trains_with_the_paper_recipe(tmp_path, monkeypatch):
    data = _class_folders(tmp_path / "many", {"a": 6, "b": 6})
    (data / "train").mkdir()
    for name in ("a", "b"):
        (data / name).rename(data / "train" / name)
    monkeypatch.setattr(classify_config, "SMALL_DATA_IMAGES", 12)
    assert TrainConfig(data=str(data)).recipe_choice()[0] == "paper"
    monkeypatch.setattr(classify_config, "SMALL_DATA_IMAGES", 13)
    classify_config._training_images.cache_clear()
    assert TrainConfig(data=str(data)).recipe_choice()[0] == "small"


def test_the_digits_keep_the_small_recipe_without_flips():
    recipe, why = TrainConfig().recipe_choice()
    assert recipe == "small" and "no flips" in why
    assert TrainConfig().resolve().hflip == 0.0
    assert TrainConfig(recipe="small", data=None).resolve().hflip == 0.0


def test_weights_and_an_explicit_recipe_keep_their_choice(tmp_path):
    data = _class_folders(tmp_path / "few", {"a": 3, "b": 3})
    assert TrainConfig(data=str(data), pretrained=True).recipe_choice()[0] == "finetune"
    assert TrainConfig(data=str(data), recipe="paper").recipe_choice() == ("paper", "asked for with --recipe")


def test_train_prints_the_recipe_and_why_first(tmp_path, capsys):
    argv = ["classify", "train", "--model-kwargs", TINY, "--epochs", "1", "--limit-train", "16"]
    argv += ["--limit-val", "16", "--batch-size", "16", "--output", str(tmp_path / "run")]
    assert main(argv) == 0
    first = next(line for line in capsys.readouterr().err.splitlines() if line.strip())
    assert first.startswith("recipe small: the embedded digits' default")


def test_count_images_stops_at_its_bound(tmp_path):
    _class_folders(tmp_path / "d", {"a": 4, "b": 4})
    (tmp_path / "d" / "a" / "notes.txt").write_text("not an image")
    assert count_images(tmp_path / "d", 100) == 8
    assert count_images(tmp_path / "d", 5) == 5
    assert count_images(tmp_path / "missing", 5) == 0

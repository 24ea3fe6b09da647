"""The finetune recipe (the small recipe with its own differences) keeps the model's drop path and crop."""

import pytest

from metaformer.tasks.classify.config import TrainConfig


@pytest.mark.parametrize("model", ["poolformer_s12", "poolformer_m36"])
def test_finetune_takes_drop_path_and_crop_from_the_model(model):
    finetune = TrainConfig(model=model, data="/d", init_checkpoint="w.safetensors").resolve()
    paper = TrainConfig(model=model, data="/d", recipe="paper").resolve()  # the model's values too
    assert finetune.recipe == "finetune"
    assert (finetune.drop_path_rate, finetune.crop_pct) == (paper.drop_path_rate, paper.crop_pct)
    assert finetune.drop_path_rate > 0 and finetune.crop_pct < 1  # not the small recipe's 0 and 1

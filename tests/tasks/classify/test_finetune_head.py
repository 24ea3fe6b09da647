"""Fine-tuning from a classifier trained on other classes (the same count) starts a new classifier and
keeps every other tensor; from one trained on the same classes it keeps the head too."""

import pytest
import torch

from metaformer.models.factory import create_model
from metaformer.tasks.classify.config import TrainConfig
from metaformer.tasks.classify.train import _build_model
from metaformer.weights.folder import save_pretrained
from metaformer.weights.io import save_weights

TINY = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
CLASSES = ["cat", "dog", "fox", "owl", "yak"]
HEAD = ("head.fc.weight", "head.fc.bias")


def saved_classifier(tmp_path, form: str) -> tuple[dict[str, torch.Tensor], str]:
    """A 5-class classifier's state dict (every tensor away from its init, head bias included) and
    the checkpoint it was saved to: a safetensors file or a hub-style folder."""
    model = create_model("poolformer_s12", num_classes=len(CLASSES), **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if form == "file":
        path = tmp_path / "five.safetensors"
        save_weights(model, path, class_names=CLASSES)
    else:
        path = save_pretrained(model, tmp_path / "five", class_names=CLASSES)
    return {k: v.clone() for k, v in model.state_dict().items()}, str(path)


@pytest.mark.parametrize("form", ["file", "folder"])
def test_other_classes_of_the_same_count_get_a_new_head_and_keep_the_rest(tmp_path, form):
    saved, path = saved_classifier(tmp_path, form)
    config = TrainConfig(model_kwargs=TINY, init_checkpoint=path).resolve()
    built = _build_model(config, len(CLASSES), ["ant", "bee", "cow", "eel", "emu"]).state_dict()
    assert built.keys() == saved.keys()
    for name in HEAD:
        assert built[name].shape == saved[name].shape and not torch.equal(built[name], saved[name]), name
    for name in saved.keys() - set(HEAD):
        assert torch.equal(built[name], saved[name]), name


@pytest.mark.parametrize("form", ["file", "folder"])
def test_the_same_classes_keep_the_head(tmp_path, form):
    saved, path = saved_classifier(tmp_path, form)
    config = TrainConfig(model_kwargs=TINY, init_checkpoint=path).resolve()
    built = _build_model(config, len(CLASSES), list(CLASSES)).state_dict()
    assert built.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(built[name], tensor), name


def test_the_same_classes_in_another_order_get_a_new_head(tmp_path):
    saved, path = saved_classifier(tmp_path, "file")
    config = TrainConfig(model_kwargs=TINY, init_checkpoint=path).resolve()
    built = _build_model(config, len(CLASSES), CLASSES[::-1]).state_dict()
    assert not torch.equal(built["head.fc.weight"], saved["head.fc.weight"])
    assert torch.equal(built["head.norm.weight"], saved["head.norm.weight"])

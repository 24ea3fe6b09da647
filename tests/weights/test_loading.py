"""weights/loading.py: building a model for a checkpoint that covers it, without the random init."""

from __future__ import annotations

import pytest
import torch

from metaformer import create_model, save_weights
from metaformer.errors import CheckpointError
from metaformer.models import MetaFormer
from metaformer.weights import loading, model_from_weights

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 8, 8, 8)}


def _build():
    return MetaFormer(num_classes=3, **TINY)


def test_a_checkpoint_with_every_tensor_is_taken_as_the_models_own(monkeypatch):
    reference = _build().eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    monkeypatch.setattr(loading, "_load_into", lambda *a: pytest.fail("the init was not skipped"))
    model = loading.build_loaded(_build, state, "metaformer", "test").eval()
    assert list(loading._meta_tensors(model)) == []
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("change", ["missing", "shape", "dtype"])
def test_any_other_checkpoint_is_built_and_checked_as_before(change):
    state = _build().state_dict()
    if change == "missing":
        del state["stages.0.blocks.0.norm1.weight"]
    elif change == "shape":
        state["stages.0.blocks.0.norm1.weight"] = torch.ones(9)
    else:  # a half-precision file: loaded into the float32 model, not taken as it is
        state = {k: v.half() for k, v in state.items()}
    if change == "dtype":
        model = loading.build_loaded(_build, state, "metaformer", "test")
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert list(loading._meta_tensors(model)) == []
    else:
        with pytest.raises(CheckpointError):
            loading.build_loaded(_build, state, "metaformer", "test")


def test_model_from_weights_skips_the_init_and_still_reinitialises_a_new_classifier(tmp_path, monkeypatch):
    model = create_model("poolformer_s12", num_classes=3, **TINY).eval()
    save_weights(model, tmp_path / "c.safetensors", class_names=["a", "b", "c"])
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model_from_weights(tmp_path / "c.safetensors").eval()(x), model(x))
    other = model_from_weights(tmp_path / "c.safetensors", num_classes=5)  # the classifier: fresh init
    assert other.head.fc.weight.shape[0] == 5 and list(loading._meta_tensors(other)) == []

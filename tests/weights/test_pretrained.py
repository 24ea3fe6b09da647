"""weights/pretrained.py: every released-weights record is consistent with the model it names."""

from __future__ import annotations

import re

import pytest
import torch

from metaformer import UnknownModelError, create_model, list_models
from metaformer.weights import DEFAULT_TAGS, PRETRAINED, get_weights, resolve_tag


@pytest.fixture(scope="module")
def param_counts():
    """Parameter count per (model, num_classes), built on the meta device (no memory, no init)."""
    cache: dict[str, tuple[int, torch.nn.Module]] = {}

    def count(name: str, num_classes: int) -> int:
        if name not in cache:
            with torch.device("meta"):
                model = create_model(name)
            cache[name] = (sum(p.numel() for p in model.parameters()), model.get_classifier())
        total, classifier = cache[name]
        last = classifier.fc2 if hasattr(classifier, "fc2") else classifier
        return total + (num_classes - 1000) * (last.in_features + 1)  # a bigger last layer

    return count


def test_every_record_names_a_registered_model_and_counts_its_parameters(param_counts):
    registered = set(list_models())
    for tag, record in PRETRAINED.items():
        assert record.model_name in registered, tag
        assert record.num_params == param_counts(record.model_name, record.num_classes), tag


def test_records_follow_the_release_conventions():
    for tag, record in PRETRAINED.items():
        assert record.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", record.sha256), tag
        assert record.interpolation == "bicubic"
        if record.layout == "official":
            assert (
                record.url
                == f"https://github.com/sail-sg/poolformer/releases/download/v1.0/{record.filename}"
            )
            assert record.filename == f"{record.model_name}.pth.tar"
        else:
            family = record.model_name.split("_")[0]
            assert record.url.startswith(
                f"https://huggingface.co/sail/dl/resolve/main/{family}/{record.model_name}"
            )
            assert record.crop_pct == 1.0
        assert (record.input_size[1] == 384) == tag.endswith("_384"), tag
        assert (record.num_classes == 21_841) == tag.endswith("in22k"), tag
    for size in ("s12", "s24", "s36"):
        assert PRETRAINED[f"poolformer_{size}.sail_in1k"].crop_pct == 0.9
    for size in ("m36", "m48"):
        assert PRETRAINED[f"poolformer_{size}.sail_in1k"].crop_pct == 0.95


def test_default_tags_cover_every_model_with_released_weights():
    assert set(DEFAULT_TAGS) == {record.model_name for record in PRETRAINED.values()}
    assert set(DEFAULT_TAGS) == set(list_models())  # every registered model has released weights
    assert resolve_tag("poolformer_s12") == "poolformer_s12.sail_in1k"
    assert get_weights("caformer_s18.sail_in1k_384").input_size == (3, 384, 384)
    assert get_weights("poolformer_m36").preprocessing()["crop_pct"] == 0.95
    with pytest.raises(UnknownModelError, match="did you mean 'caformer_s18"):
        resolve_tag("caformer_s81")

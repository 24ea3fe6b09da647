"""weights/io.py: safe reading, atomic writing, our safetensors format and training-state files."""

from __future__ import annotations

import argparse

import pytest
import torch

from metaformer import CheckpointError, create_model
from metaformer.weights import (
    atomic_write,
    load_state,
    model_from_weights,
    read_metadata,
    read_state_dict,
    save_state,
    save_weights,
)

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


class WritesAFile:
    """A pickle payload that creates a file when unpickled by an unsafe loader."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_atomic_write_replaces_target_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".json") and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # untouched until the block succeeds
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left behind


def test_read_state_dict_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth' does not exist"):
        read_state_dict(missing)
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("poolformer_s12", checkpoint_path=missing, **TINY)


@pytest.mark.parametrize("suffix", [".pth", ".pth.tar", ".safetensors"])
def test_read_state_dict_rejects_garbage(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a PyTorch or safetensors checkpoint"):
        read_state_dict(path)


def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"stem.conv.weight": torch.zeros(1), "payload": WritesAFile(marker)}, path)
    with pytest.raises(CheckpointError, match="refuses to run code in a pickle; convert it to safetensors"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="refuses to run code"):
        create_model("poolformer_s12", checkpoint_path=path, **TINY)
    with pytest.raises(CheckpointError, match="refuses to run code"):
        load_state(path)
    assert not marker.exists()


def test_read_state_dict_unwraps_wrappers_and_strips_prefixes(tmp_path):
    weight, ema = torch.randn(3), torch.randn(3)
    path = tmp_path / "train.pth"
    torch.save(
        {
            "model": {"module.stem.conv.weight": weight},
            "state_dict_ema": {"module._orig_mod.stem.conv.weight": ema},
            "epoch": 4,
        },
        path,
    )
    state = read_state_dict(path)
    assert list(state) == ["stem.conv.weight"]
    assert torch.equal(state["stem.conv.weight"], ema)  # EMA weights are preferred, as in timm


def test_save_weights_round_trip_rebuilds_identical_model(tmp_path):
    model = create_model(
        "caformer_s18", num_classes=3, mixers=("sepconv", "pooling", "attention", "attention"), **TINY
    ).eval()
    path = tmp_path / "model.safetensors"
    save_weights(model, path, class_names=["cat", "dog", "owl"], metadata={"epoch": 7, "note": "x"})
    meta = read_metadata(path)
    assert meta["model_name"] == "caformer_s18"
    assert meta["class_names"] == ["cat", "dog", "owl"]
    assert meta["config"]["mixers"] == ["sepconv", "pooling", "attention", "attention"]
    assert meta["epoch"] == "7" and meta["note"] == "x"
    rebuilt = model_from_weights(path).eval()
    assert rebuilt.model_name == "caformer_s18" and rebuilt.num_classes == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_features_backbone_round_trip(tmp_path):
    features = create_model("poolformer_s12", features_only=True, out_indices=(1, 2), out_norm=True, **TINY)
    with torch.no_grad():
        for norm in features.out_norms:
            norm.weight.uniform_(0.5, 1.5)
    path = tmp_path / "backbone.safetensors"
    save_weights(features, path)
    assert read_metadata(path)["features"] == {"out_indices": [1, 2], "out_norm": "groupnorm1"}
    rebuilt = model_from_weights(path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(rebuilt(x), features.eval()(x), strict=True):
            assert torch.equal(a, b)


def test_save_weights_handles_shared_and_non_contiguous_tensors(tmp_path):
    model = create_model("poolformer_s12", num_classes=64, **TINY)
    model.head.fc.weight.data = model.head.fc.weight.data.t().contiguous().t()  # non-contiguous view
    model.stages[3].blocks[0].layer_scale2.scale = model.stages[3].blocks[0].layer_scale1.scale  # tied
    path = tmp_path / "tied.safetensors"
    save_weights(model, path)
    state = read_state_dict(path)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value)


def test_read_metadata_rejects_files_that_are_not_ours(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"stem.conv.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a metaformer weights file"):
        read_metadata(path)
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not a metaformer weights file"):
        model_from_weights(tmp_path / "x.pth")


def test_save_weights_checks_class_name_count(tmp_path):
    model = create_model("poolformer_s12", num_classes=3, **TINY)
    with pytest.raises(CheckpointError, match="2 class names given but the model has 3 classes"):
        save_weights(model, tmp_path / "m.safetensors", class_names=["a", "b"])
    assert not list(tmp_path.iterdir())


def test_training_state_round_trip_is_weights_only_loadable(tmp_path):
    state = {
        "model": {"w": torch.randn(2, 2)},
        "epoch": 3,
        "rng": torch.get_rng_state(),
        "history": [0.5, None, (1, "a")],
    }
    path = tmp_path / "last.pth"
    save_state(state, path)
    loaded = load_state(path)
    assert loaded["epoch"] == 3 and loaded["history"] == [0.5, None, (1, "a")]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["rng"], state["rng"])


def test_save_state_rejects_objects_that_would_not_reload(tmp_path):
    path = tmp_path / "last.pth"
    with pytest.raises(CheckpointError, match=r"state\['args'\] is a Namespace"):
        save_state({"args": argparse.Namespace(lr=1.0)}, path)
    assert not path.exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state(path)


def test_save_weights_unwraps_data_parallel(tmp_path):
    model = create_model("poolformer_s12", num_classes=2, **TINY)
    path = tmp_path / "dp.safetensors"
    save_weights(torch.nn.DataParallel(model), path)
    assert read_metadata(path)["model_name"] == "poolformer_s12"
    assert set(read_state_dict(path)) == set(model.state_dict())


def test_models_package_does_not_import_weights_at_module_level():
    """models/ stays free of file I/O: create_model imports metaformer.weights only when asked to load."""
    import ast
    from pathlib import Path

    import metaformer.models

    for source in Path(metaformer.models.__file__).parent.glob("*.py"):
        for node in ast.parse(source.read_text()).body:  # top-level statements only
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("metaformer.weights"), source.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("metaformer.weights") for a in node.names), source.name

import json
import random

import numpy as np
import pytest
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from metaformer.engine import state as run_state
from metaformer.errors import ConfigError
from metaformer.weights import load_state, save_state


def _draws():
    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        [random.random() for _ in range(3)],
        np.random.randn(1).tolist(),
    )


def test_rng_state_round_trip_replays_every_generator():
    np.random.randn()  # leave a cached gaussian in numpy's state
    saved = run_state.rng_state()
    first = _draws()
    run_state.set_rng_state(saved)
    assert _draws() == first


def test_training_state_reloads_with_weights_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(
        optimizer, "cosine", num_epochs=4, warmup_epochs=1, step_on_epochs=False, updates_per_epoch=3
    )
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step_update(1)
    state = run_state.training_state(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        ema=None,
        epoch=1,
        num_updates=1,
        best_metric=50.0,
        best_epoch=1,
        history=[{"epoch": 1, "top1": 50.0}],
        rng=[run_state.rng_state()],
    )
    save_state(state, tmp_path / "last.pt")
    loaded = load_state(tmp_path / "last.pt")  # torch.load(weights_only=True) inside
    assert loaded["epoch"] == 1 and loaded["history"] == [{"epoch": 1, "top1": 50.0}]
    fresh = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    fresh.load_state_dict(loaded["optimizer"])
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert loaded["scheduler"]["t_initial"] == scheduler.t_initial


def test_run_folder_holding_a_run_is_not_overwritten(tmp_path):
    out = run_state.prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run .*--resume.*--overwrite"):
        run_state.prepare_run_dir(out, resume=False, overwrite=False)
    run_state.prepare_run_dir(out, resume=False, overwrite=True)
    assert not (out / "metrics.jsonl").exists() and (out / "notes.txt").read_text() == "mine"


def test_resume_removes_the_temp_files_a_killed_run_left_and_nothing_else(tmp_path):
    """A SIGKILL mid-write skips atomic_write's clean-up; the resumed run owns the folder again."""
    out = run_state.prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    (out / "last.pt").write_bytes(b"state")
    with pytest.raises(KeyboardInterrupt), run_state.atomic_write(out / "curves.png") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # the clean path removes its own temp file
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    killed = [out / ".curves.png.k1ll3d.tmp.png", out / ".last.pt.x9y8z7.tmp.pt"]  # what a SIGKILL leaves
    for path in killed:
        path.write_bytes(b"half")
    theirs = [out / ".notes.txt.abc.tmp.txt", out / "curves.tmp.png"]  # not temp files of a run's writes
    for path in theirs:
        path.write_text("mine")
    run_state.prepare_run_dir(out, resume=True, overwrite=False)
    assert not any(p.exists() for p in killed) and all(p.exists() for p in theirs)
    assert (out / "last.pt").read_bytes() == b"state"


def test_resume_without_a_state_and_output_that_is_a_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_state.prepare_run_dir(tmp_path, resume=True, overwrite=False)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_state.prepare_run_dir(afile, resume=False, overwrite=False)


def test_resume_config_check_names_the_changed_option():
    run_state.check_resume_config(
        {"lr": 1, "resume": False}, {"lr": 1, "resume": True}, may_differ=("resume",)
    )
    with pytest.raises(ConfigError, match="lr: run has 1, now 2"):
        run_state.check_resume_config({"lr": 1}, {"lr": 2})


def test_metrics_and_json_files_round_trip(tmp_path):
    records = [{"epoch": 1, "top1": 10.0}, {"epoch": 2, "top1": 20.0}]
    run_state.write_metrics(tmp_path / "m.jsonl", records)
    assert run_state.read_metrics(tmp_path / "m.jsonl") == records
    run_state.write_json(tmp_path / "s.json", {"a": (1, 2)})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1, 2]}
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave no temp files


def test_curves_png_is_written(tmp_path):
    records = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "top1": 10.0 * e, "lr": 1e-3}
        for e in (1, 2, 3)
    ]
    run_state.plot_curves(records, tmp_path / "curves.png", ["top1"])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

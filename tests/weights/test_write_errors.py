"""Writes that fail (full disk, torch's serializer stopping mid-file, read-only or vanished folder) become one
WriteError sentence naming the file, the free space and that the previous file is untouched."""

import contextlib
import errno
import os
import subprocess
import uuid

import pytest
import torch

from metaformer.cli import main
from metaformer.errors import DataError, WriteError
from metaformer.weights import atomic_write, load_state, save_state, write_weights

TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 33070272 vs 33070160"


def _half_written_save(obj, path, *args, **kwargs):
    """What torch.save does on a full disk: some bytes land, then the zip writer gives up."""
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 partial")
    raise RuntimeError(TORCH_FULL)


def test_torch_serializer_failing_mid_write_names_file_space_and_keeps_the_previous(tmp_path, monkeypatch):
    target = tmp_path / "run" / "last.pt"
    save_state({"epoch": 1, "w": torch.ones(3)}, target)
    monkeypatch.setattr(torch, "save", _half_written_save)
    with pytest.raises(WriteError) as info:
        save_state({"epoch": 2, "w": torch.zeros(3)}, target)
    message = str(info.value)
    assert str(target) in message and "disk is full" in message and " free " in message
    assert "previous last.pt is untouched" in message and "--output" in message
    assert "\n" not in message and "inline_container" not in message
    assert load_state(target)["epoch"] == 1  # the previous checkpoint still loads
    assert os.listdir(target.parent) == ["last.pt"]  # no temp file left behind


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("I/O error: No space left on device (os error 28)"),
    ],
)
def test_enospc_from_any_writer_is_one_sentence(tmp_path, error):
    target = tmp_path / "metrics.jsonl"
    with pytest.raises(
        WriteError, match=r"'.*metrics.jsonl': the disk is full \(.* free .*no metrics.jsonl was"
    ):
        with atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise error
    assert not target.exists() and os.listdir(tmp_path) == []


def test_read_only_folder(tmp_path, monkeypatch):
    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(dir) + "/tmpx")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(WriteError, match="is read-only .*make it writable or pass another --output"):
        save_state({"epoch": 1}, tmp_path / "last.pt")


def test_vanished_folder(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(
        WriteError, match="no longer exists or is not a folder; .*recreate it or pass another"
    ):
        with atomic_write(run / "last.pt") as tmp:
            tmp.unlink()
            run.rmdir()
            torch.save({"epoch": 1}, tmp)
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match="no longer exists or is not a folder"):
        save_state({"epoch": 1}, tmp_path / "file" / "last.pt")


def test_other_errors_in_the_writer_pass_through(tmp_path):
    with pytest.raises(DataError, match="not a write problem"):
        with atomic_write(tmp_path / "x.json"):
            raise DataError("not a write problem")


def test_cli_prints_the_sentence(tmp_path, monkeypatch, capsys):
    def train(config):
        save_state({"epoch": 1}, tmp_path / "last.pt")

    monkeypatch.setattr("metaformer.tasks.classify.train_classifier", train)
    monkeypatch.setattr(torch, "save", _half_written_save)
    assert main(["classify", "train"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("metaformer: error: cannot write") and "\n" not in err and "Traceback" not in err


@contextlib.contextmanager
def _tmpfs(tmp_path, size="256k"):
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_real_full_and_read_only_tmpfs(tmp_path):
    with _tmpfs(tmp_path) as mount:
        save_state({"epoch": 1}, mount / "last.pt")
        with pytest.raises(WriteError, match=r"the disk is full \(\d.* free .*previous last.pt is untouched"):
            save_state({"epoch": 2, "big": torch.zeros(200_000)}, mount / "last.pt")  # 800 kB > 256 kB
        assert load_state(mount / "last.pt")["epoch"] == 1
        with pytest.raises(WriteError, match="the disk is full"):
            write_weights({"w": torch.zeros(200_000)}, mount / "w.safetensors", model_name="x", config={})
        assert sorted(os.listdir(mount)) == ["last.pt"]
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(WriteError, match="is read-only"):
            save_state({"epoch": 2}, mount / "last.pt")

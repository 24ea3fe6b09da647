"""weights/download.py: cached, sha256-checked downloads; file:// URLs only (no network in tests)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import pytest
import torch

from metaformer import DownloadError, UnknownModelError, create_model
from metaformer.cli import main
from metaformer.weights import PRETRAINED, cache_dir, download_weights, to_official_keys

TINY = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}


@pytest.fixture
def home(tmp_path, monkeypatch):
    folder = tmp_path / "home"
    monkeypatch.setenv("METAFORMER_HOME", str(folder))
    return folder


@pytest.fixture
def release(tmp_path):
    """A tiny S12-shaped checkpoint in the official layout, served from a file:// URL."""
    source = create_model("poolformer_s12", **TINY)
    path = tmp_path / "upstream" / "poolformer_s12.pth.tar"
    path.parent.mkdir()
    torch.save(to_official_keys(source.state_dict()), path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return source, path, sha


def test_cache_dir_follows_metaformer_home(home):
    assert cache_dir() == home


def test_download_with_right_sha256_lands_in_cache_and_is_reused(home, release):
    _, path, sha = release
    first = download_weights("poolformer_s12", url=path.as_uri(), sha256=sha)
    assert first == home / "poolformer_s12.pth.tar"
    assert first.read_bytes() == path.read_bytes()
    path.unlink()  # a second call must not need the source any more
    assert download_weights("poolformer_s12", url=path.as_uri(), sha256=sha) == first
    assert [p.name for p in home.iterdir()] == ["poolformer_s12.pth.tar"]


def test_download_with_wrong_sha256_leaves_nothing_in_cache(home, release):
    _, path, sha = release
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=f"sha256 of {path.as_uri()} is {sha}, expected {wrong}"):
        download_weights("poolformer_s12", url=path.as_uri(), sha256=wrong)
    assert list(home.iterdir()) == []  # neither the file nor a temp file


def test_unreachable_url_is_one_sentence_with_the_fix(home, tmp_path):
    url = (tmp_path / "does-not-exist.pth").as_uri()
    with pytest.raises(
        DownloadError, match=r"could not download .*does-not-exist.pth.*checkpoint_path="
    ) as info:
        download_weights("poolformer_s12", url=url)
    assert "\n" not in str(info.value)
    assert list(home.iterdir()) == []


def test_unknown_weights_name_suggests_close_matches(home):
    with pytest.raises(UnknownModelError, match="no released weights named 'poolformer_s13'.*poolformer_s12"):
        download_weights("poolformer_s13")


def test_progress_bar_does_not_change_the_file(home, release, capsys):
    _, path, sha = release
    cached = download_weights("poolformer_s12", url=path.as_uri(), sha256=sha, progress=True)
    assert cached.read_bytes() == path.read_bytes()


def test_pretrained_true_downloads_loads_and_warns_unverified(home, release, monkeypatch, caplog):
    source, path, _ = release
    record = dataclasses.replace(PRETRAINED["poolformer_s12.sail_in1k"], url=path.as_uri(), sha256=None)
    monkeypatch.setitem(PRETRAINED, record.tag, record)
    with caplog.at_level(logging.WARNING, logger="metaformer.weights"):
        model = create_model("poolformer_s12", pretrained=True, **TINY)
    assert "unverified" in caplog.text
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_cli_download_uses_the_record(home, release, monkeypatch, capsys):
    _, path, sha = release
    record = dataclasses.replace(PRETRAINED["poolformer_s12.sail_in1k"], url=path.as_uri(), sha256=sha)
    monkeypatch.setitem(PRETRAINED, record.tag, record)
    assert main(["download", "poolformer_s12"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "poolformer_s12.pth.tar")
    other = home.parent / "elsewhere"
    assert main(["download", "poolformer_s12.sail_in1k", "--cache-dir", str(other)]) == 0
    assert (other / "poolformer_s12.pth.tar").is_file()


def test_cli_download_hash_mismatch_exits_1(home, release, monkeypatch, capsys):
    _, path, _ = release
    record = dataclasses.replace(PRETRAINED["poolformer_s12.sail_in1k"], url=path.as_uri(), sha256="f" * 64)
    monkeypatch.setitem(PRETRAINED, record.tag, record)
    assert main(["download", "poolformer_s12"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("metaformer: error: sha256 of") and "Traceback" not in err
    assert not home.exists() or list(home.iterdir()) == []

"""Typo'd local paths fail at once, never as a Hub lookup; failed Hub lookups offline are one line."""

from __future__ import annotations

import os

import pytest

from kvshift import paths
from kvshift.cli import main


def test_looks_like_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for spec in ("./corpus", "../corpus", "/abs/corpus", "~/corpus", ".hidden", "data/corpuss2"):
        assert paths.looks_like_path(spec), spec
    for spec in ("corpuss2", "Qwen/Qwen2.5-0.5B", "HuggingFaceFW/fineweb-edu"):
        assert not paths.looks_like_path(spec), spec


def test_check_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus2").mkdir()
    assert paths.check_local_path("corpus2", "--source").resolve() == (tmp_path / "corpus2").resolve()
    with pytest.raises(FileNotFoundError, match=r"--source ./corpuss2: no such file or directory.*corpus2"):
        paths.check_local_path("./corpuss2", "--source")
    with pytest.raises(FileNotFoundError, match="--resume nowhere"):
        paths.check_local_path("nowhere", "--resume", must_exist=True)
    assert paths.check_local_path("Org/model", "--from") is None  # may be a Hub id


def _no_hub(*args, **kwargs):
    raise AssertionError("a path-like argument reached the Hub")


def test_missing_local_paths_never_reach_the_hub(tmp_path, monkeypatch, capsys):
    import datasets
    import transformers

    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", _no_hub)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "prepare", "--source", "./corpuss2", "--out", "out"]) == 2
    assert main(["convert", "--from", "./nope", "--to", "out"]) == 2
    assert main(["eval", "--model", "./nope", "--tasks", "x"]) == 2
    assert main(["generate", "--model", "./nope", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all("nope" in line or "corpuss2" in line for line in err)
    assert not (tmp_path / "out").exists()


def test_hub_lookups_offline_are_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["data", "prepare", "--source", "corpuss2", "--out", "out"]) == 2
    assert main(["convert", "--from", "SomeOrg/some-model", "--to", "out"]) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kvshift ")]
    assert len(lines) == 2 and all("could not be reached" in line for line in lines), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_hub_errors_classify():
    with pytest.raises(paths.HubUnavailable, match="could not be reached"):
        with paths.hub_errors("--from", "a/b"):
            raise ConnectionError("Max retries exceeded with url: https://huggingface.co/a/b")
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor found"):
        with paths.hub_errors("--source", "a/b"):
            raise FileNotFoundError("Dataset 'a/b' doesn't exist on the Hub")
    with pytest.raises(KeyError):
        with paths.hub_errors("tasks", "x", only_offline=True):
            raise KeyError("an unrelated bug is not hidden")


def test_offline_if_unreachable_sets_and_restores(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(paths, "hub_reachable", lambda timeout=3.0: False)
    import huggingface_hub.constants as hc

    before = hc.HF_HUB_OFFLINE
    with paths.offline_if_unreachable() as reachable:
        assert reachable is False and os.environ["HF_HUB_OFFLINE"] == "1" and hc.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and hc.HF_HUB_OFFLINE is before

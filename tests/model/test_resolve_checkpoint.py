"""Where ``--model`` finds a checkpoint: a directory, a model fetched under the data root, a hub id in the
local Hugging Face cache, else a one-line error naming the command that downloads it."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from tlvr_cli.errors import TlvrError
from tlvr_cli.model.checkpoint import resolve_checkpoint

R1 = "Zhang199/TinyLLaVA-Video-R1"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty data root and an empty hub cache."""
    monkeypatch.setenv("TLVR_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_directory_must_hold_a_config(offline):
    (offline / "ckpt").mkdir()
    with pytest.raises(TlvrError, match=r"ckpt: not a checkpoint directory \(no config.json\)"):
        resolve_checkpoint(str(offline / "ckpt"))
    (offline / "ckpt" / "config.json").write_text("{}")
    assert resolve_checkpoint(str(offline / "ckpt")) == offline / "ckpt"


def test_a_hub_id_finds_the_fetched_copy_first(offline):
    fetched = offline / "data" / "models" / "TinyLLaVA-Video-R1"
    fetched.mkdir(parents=True)
    (fetched / "config.json").write_text("{}")
    assert resolve_checkpoint(R1) == fetched


def test_a_hub_id_finds_its_snapshot_in_the_hub_cache(offline):
    # the cache's layout: models--owner--name/{refs/main, snapshots/<commit>/...}
    repo = offline / "hub" / "models--someone--video-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_checkpoint("someone/video-model") == repo / "snapshots" / commit


@pytest.mark.parametrize(("model", "fix"), [(R1, "`tlvr data fetch r1`"),
                                            ("someone/else", "`hf download someone/else`")])
def test_a_hub_id_not_downloaded_names_the_command_that_fetches_it(offline, model, fix):
    with pytest.raises(TlvrError) as err:
        resolve_checkpoint(model)
    assert str(err.value) == (f"checkpoint {model!r} is neither a directory nor downloaded: run {fix} "
                              "(or pass the path of a local copy)")

"""The trainer state cannot run code: it is JSON + safetensors, and a pickle beside it is never read
(an older tlvr's ``trainer_state.pt``, or a crafted one, is refused or ignored)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from train_runs import grpo_cfg, same_weights

from tlvr_cli.errors import TlvrError
from tlvr_cli.train.run_dir import LEGACY_STATE_FILE, STATE_FILE, TENSORS_FILE, list_checkpoints, read_trainer_state


class Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_pickle_payload_in_a_checkpoint_is_never_executed(synth_root, tiny_ckpt, tmp_path):
    from tlvr_cli.train.grpo import run_grpo

    full = run_grpo(grpo_cfg(synth_root, tmp_path / "a", tiny_ckpt, optim={"max_steps": 2}), show_progress=False)
    run_grpo(grpo_cfg(synth_root, tmp_path / "b", tiny_ckpt, optim={"max_steps": 1}, output={"save_every": 1}),
             show_progress=False)
    [ckpt] = list_checkpoints(tmp_path / "b")
    marker = tmp_path / "ran.txt"
    # a crafted pickle beside the real state: resuming reads only the JSON and the safetensors
    (ckpt / LEGACY_STATE_FILE).write_bytes(pickle.dumps({"optimizer": Payload(marker)}))
    payload, tensors = read_trainer_state(ckpt)
    assert payload["step"] == 1 and tensors and not marker.exists()
    resumed = run_grpo(grpo_cfg(synth_root, tmp_path / "b", tiny_ckpt, optim={"max_steps": 2}), resume="auto",
                       show_progress=False)
    assert not marker.exists()
    same_weights(full, resumed)  # resume equality still holds

    # a checkpoint that holds only a pickle (an older tlvr's, or a crafted one) is refused, unread
    legacy = tmp_path / "legacy"
    shutil.copytree(ckpt, legacy)
    (legacy / STATE_FILE).unlink()
    (legacy / TENSORS_FILE).unlink()
    with pytest.raises(TlvrError, match="pickle written by an older tlvr; it is not loaded") as e:
        run_grpo(grpo_cfg(synth_root, tmp_path / "c", tiny_ckpt, optim={"max_steps": 2}), resume=str(legacy),
                 show_progress=False)
    assert "\n" not in str(e.value) and not marker.exists()


def test_the_trainer_state_is_plain_json_and_safetensors(synth_root, tiny_ckpt, tmp_path):
    from safetensors import safe_open

    from tlvr_cli.train.grpo import run_grpo

    run_grpo(grpo_cfg(synth_root, tmp_path / "r", tiny_ckpt, optim={"max_steps": 1}), show_progress=False)
    [ckpt] = list_checkpoints(tmp_path / "r")
    state = json.loads((ckpt / STATE_FILE).read_text())  # any JSON reader can inspect it
    assert state["step"] == 1 and {"cursor", "scheduler", "rng", "optimizer"} <= set(state)
    with safe_open(str(ckpt / TENSORS_FILE), "pt") as f:
        assert "rng.torch" in set(f.keys())
    assert not (ckpt / LEGACY_STATE_FILE).exists()

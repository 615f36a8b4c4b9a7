"""Fixtures of the training tests: a small synthetic set and the tiny model's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlvr_cli.jobs import SynthConfig
from tlvr_cli.model.checkpoint import save_model


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from tlvr_cli.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(SynthConfig(root=str(root), train=16, eval=8, coldstart=8, size=32, seed=0))
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from tlvr_cli.model.tiny import build_tiny_model

    return save_model(build_tiny_model(), tmp_path_factory.mktemp("ck") / "tiny")

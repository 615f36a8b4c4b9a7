"""The persistent compile cache: where it lives, and that it is in place before the engine's first compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir, triton_cache_dir

from tlvr_cli.runtime import compile_cache_dir, use_compile_cache

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os
from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir
from tlvr_cli.engine.layers import compiled_decode
before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
compiled_decode()
print(json.dumps({"before": before, "inductor": cache_dir(), "triton": triton_cache_dir(0)}))
"""


def test_compile_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("TLVR_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("TLVR_DATA", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "compile-cache"
    monkeypatch.setenv("TLVR_COMPILE_CACHE", str(tmp_path / "cc"))
    assert compile_cache_dir() == tmp_path / "cc"
    monkeypatch.setenv("TLVR_COMPILE_CACHE", "off")
    assert compile_cache_dir() is None


def test_the_engine_compiles_into_the_tlvr_cache(tmp_path):
    # a fresh process, as a run starts: importing the engine (transformers imports torch's compiler)
    # fills in torch's temp-dir default, and the set-up before the first compile replaces it
    unset = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TLVR_COMPILE_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(PYTHONPATH=str(ROOT), TLVR_DATA=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    cache = tmp_path / "compile-cache"
    assert got["before"] == default_cache_dir()
    assert Path(got["inductor"]) == cache and cache.is_dir()
    assert Path(got["triton"]).is_relative_to(cache)  # the Triton kernels and their autotune results too


def test_a_cache_dir_the_user_chose_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("TLVR_DATA", str(tmp_path))
    monkeypatch.delenv("TLVR_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == tmp_path / "mine" and Path(cache_dir()) == tmp_path / "mine"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # torch's own fill-in is no choice
    monkeypatch.setenv("TLVR_COMPILE_CACHE", str(tmp_path / "cc"))
    assert use_compile_cache() == tmp_path / "cc" and Path(triton_cache_dir(0)).is_relative_to(tmp_path / "cc")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("TLVR_COMPILE_CACHE", "off")
    assert use_compile_cache() is None and cache_dir() == default_cache_dir()

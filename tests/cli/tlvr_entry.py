"""Run the real ``tlvr`` entry point as a subprocess (``python -m tlvr_cli`` or the installed console
script), importing this checkout's package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS", "TLVR_DATA")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def console_script() -> str | None:
    """The ``tlvr`` script installed beside this interpreter (a venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("tlvr")
    return str(beside) if beside.is_file() else shutil.which("tlvr")


def command(*args: str, script: bool = False) -> list[str]:
    if script:
        return [console_script() or "tlvr", *args]
    return [sys.executable, "-m", "tlvr_cli", *args]


def tlvr(*args: str, cwd: Path | None = None, script: bool = False, timeout: float = 300,
         **env: str) -> subprocess.CompletedProcess:
    """Run ``tlvr ARGS`` with stdout and stderr captured (so neither is a terminal)."""
    return subprocess.run(command(*args, script=script), cwd=cwd or REPO, env=child_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]

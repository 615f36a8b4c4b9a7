"""The README as a newcomer runs it: its first command installs what its second needs, its infer
example passes real newlines, its demo follow-up commands find the demo's data, and its Python API
block runs as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
sys.path.insert(0, str(REPO / "tests" / "cli"))
from tlvr_entry import tlvr  # noqa: E402


def fenced(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def argv_in_bash(line: str) -> list[str]:
    """The arguments bash passes to ``tlvr`` for a README line."""
    script = 'tlvr() { printf "%s\\0" "$@"; }\n' + line
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True).stdout.decode()
    return out.split("\0")[:-1]


def test_the_first_command_installs_what_the_second_needs():
    first, second = fenced("bash")[0].strip().splitlines()
    assert second == "python3 -m pytest -q"
    install = shlex.split(first.split("&&")[0])
    assert install[:2] == ["pip", "install"] and ".[test]" in install and "torch==2.13.0" in install
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(req.startswith("pytest") for req in extras)
    ci = next(ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if "pip install" in ln and " -e " in ln)
    assert "torch==2.13.0" in ci and "-e '.[test" in ci  # CI installs the same way (with more extras)


def test_the_infer_example_passes_real_newlines():
    line = next(ln for block in fenced("bash") for ln in block.splitlines() if ln.startswith("tlvr infer "))
    argv = argv_in_bash(line)
    assert argv[:2] == ["infer", "video.mp4"]
    assert argv[2] == "What is the man doing?\nA. running\nB. cooking" and "\\" not in argv[2]


def test_the_python_api_block_runs_as_written(tmp_path, monkeypatch):
    # the README says the block reads the demo's data, written by the demo or by this command
    assert "`tlvr data synth --root runs/demo-data`" in README
    made = tlvr("data", "synth", "--root", "runs/demo-data", "--set", "train=4", "--set", "eval=8",
                "--set", "coldstart=2", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    (block,) = fenced("python")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["text"], str) and namespace["report"].n == 8
    example, tokenizer = namespace["example"], namespace["model"].tokenizer
    assert example.ok and len(example.labels) == len(example.input_ids)
    # the loss covers the answer (with the space after "ASSISTANT:" that merges into its first token) and
    # its end-of-text, nothing before
    learned = [t for t in example.labels if t != -100]
    assert tokenizer.decode(learned) == " <think>red</think> <answer>B</answer><|endoftext|>"
    assert example.labels[0] == -100 and learned == example.input_ids[-len(learned):]

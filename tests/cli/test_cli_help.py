"""Help and tables as a user reads them: no type markers or internal references in --help, options
only where they apply, and tables that fold long cells instead of cutting them."""

from __future__ import annotations

import pytest
import typer
from tlvr_entry import tlvr

from tlvr_cli.cli import app, run_cli


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        yield (*path, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda p: " ".join(p) or "tlvr")
def test_help_says_the_behaviour_without_markers(path, capsys):
    assert run_cli([*path, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Usage: tlvr {' '.join(path)}".rstrip())
    for marker in ("<bool>", "§"):
        assert marker not in text, (path, marker)
    # every option names its value (N, DIR, KEY=VALUE), no <int>/<str> type labels
    heads = [line.strip().split("  ")[0] for line in text.splitlines() if line.lstrip().startswith("-")]
    assert heads and not [h for h in heads if "<" in h], heads


def test_only_videomme_has_duration():
    assert "--duration" in tlvr("eval", "videomme", "--help").stdout
    synthetic = tlvr("eval", "synthetic", "--help")
    assert synthetic.returncode == 0 and "--duration" not in synthetic.stdout and "--data-dir DIR" in synthetic.stdout


@pytest.mark.parametrize("args, cells", [
    (("data", "fetch", "--list"), ["Zhang199/TinyLLaVA-Video-Coldstart_NextQA_16", "OpenGVLab/MVBench"]),
    (("presets", "list"), ["demo-coldstart", "tlvr eval mvbench --preset eval-paper"]),
])
def test_tables_fold_long_cells_instead_of_cutting_them(args, cells):
    narrow = tlvr(*args, COLUMNS="80")
    assert narrow.returncode == 0 and "…" not in narrow.stdout
    assert all(len(line) <= 80 for line in narrow.stdout.splitlines())
    wide = tlvr(*args, COLUMNS="250")
    assert all(cell in wide.stdout for cell in cells)

"""Progress at any terminal width (the count, the bar and the ETA always fit; metrics go first) and,
without a terminal, one plain line per log step instead of redraws."""

from __future__ import annotations

import re
from io import StringIO

from rich.console import Console

from tlvr_cli.progress import JobProgress

METRICS = {"reward": 0.63, "accuracy": 0.58, "format": 0.91, "len": 212, "kl": 0.01, "s/it": 3.1}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_the_live_line_keeps_count_bar_and_eta_at_any_width():
    p = JobProgress("grpo", 687, console=Console(file=StringIO(), width=200, force_terminal=False))
    p.start(0)
    p.update(40, METRICS)
    wide = p.live_line(200).plain
    assert wide.startswith("grpo ━") and " 40/687 " in wide and "ETA " in wide
    every = "reward 0.630 | accuracy 0.580 | format 0.910 | len 212 | kl 0.010 | 3.100 s/it"
    assert wide.endswith(every)
    for width in (100, 80, 60, 40, 30):
        line = p.live_line(width).plain
        assert len(line) <= width and "40/687" in line and "ETA " in line and "───" in line, (width, line)
        # metrics are dropped whole, from the end
        shown = line.split("ETA ", 1)[1][8:]
        rest = every[len(shown):]
        assert every.startswith(shown) and (not shown or not rest or rest.startswith(" | ")), (width, line)
    assert "reward" in p.live_line(80).plain and "reward" not in p.live_line(40).plain


def test_a_narrow_terminal_gets_lines_that_fit(monkeypatch):
    out = StringIO()
    p = JobProgress("cold start", 20, console=Console(file=out, width=80, force_terminal=True, color_system=None))
    p.start(0)
    for step in range(1, 4):
        p.update(step, METRICS)
    p.stop()
    drawn = [ANSI.sub("", line) for line in re.split(r"[\r\n]", out.getvalue()) if ANSI.sub("", line).strip()]
    assert drawn and all(len(line) <= 80 for line in drawn)
    assert drawn[-1].startswith("cold start ") and " 3/20 " in drawn[-1] and "ETA " in drawn[-1]


def test_without_a_terminal_one_plain_line_per_log_step():
    out = StringIO()
    p = JobProgress("grpo", 5, console=Console(file=out, width=60, force_terminal=False), plain_every=2)
    p.start(0)
    for step in range(1, 6):
        p.update(step, {"reward": 0.5 * step, "s/it": 3.1})
    p.stop()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["grpo step 2/5", "grpo step 4/5", "grpo step 5/5"]
    plain = r"grpo step \d/5 \| reward \d\.\d{3} \| 3\.100 s/it \| ETA \d:\d\d:\d\d"
    assert all(re.fullmatch(plain, line) for line in lines)
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()  # longer than 60 columns, never wrapped

"""Progress for long jobs (training loops, evaluation).

On a terminal: one live line, ``grpo ━━━━━╸━━━ 40/687 0:02:03 ETA 1:02:03 reward 0.630 | kl 0.010``,
laid out for the terminal's width at every redraw: the step count, the ETA and a bar always fit, the
metrics are dropped from the end first. Elsewhere (a log file, a pipe, CI): one plain line per log
step, ``grpo step 40/687 | reward 0.630 | kl 0.010 | 3.10 s/it | ETA 1:02:03``, no redraws.
"""

from __future__ import annotations

import time

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

SEP = " | "
BAR_MIN, BAR_MAX = 5, 30


class JobProgress:
    """Progress over ``total`` units (steps, items) with a fixed set of metrics; ``warn`` and ``note``
    print above it (the first 20 warnings; the rest are only counted). ``plain_every``: without a
    terminal, print every that many units (and the last one)."""

    def __init__(self, title: str, total: int, *, enabled: bool = True, console: Console | None = None,
                 plain_every: int = 1) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True, highlight=False)
        self.total = total
        self.title = title
        self.plain_every = max(1, plain_every)
        self.live: Live | None = None
        self.step = 0
        self.metrics: dict[str, float] = {}
        self._t0 = 0.0
        self._first = 0
        self._warned = 0

    def start(self, completed: int = 0) -> None:
        if not self.enabled:
            return
        self.step = self._first = completed
        self._t0 = time.perf_counter()
        if self.console.is_terminal:
            self.live = Live(_Line(self), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.step, self.metrics = step, dict(metrics)
        if self.live is not None:
            self.live.refresh()
        elif step % self.plain_every == 0 or step == self.total:
            self.console.print(self.plain_line(), soft_wrap=True, markup=False, highlight=False)

    def warn(self, message: str) -> None:
        if not self.enabled:
            return
        self._warned += 1
        if self._warned <= 20:
            self.console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)
        elif self._warned == 21:
            self.console.print("[yellow]warning:[/] further skip warnings are counted in the metrics only")

    def note(self, message: str) -> None:
        """A line above the progress (shown even when the progress itself is off on this process)."""
        self.console.print(message, soft_wrap=True, markup=False, highlight=False)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    # ------------------------------------------------------------------ text

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def eta(self) -> float | None:
        """Seconds left at the mean pace of the units done since ``start`` (None before the first)."""
        done = self.step - self._first
        return self.elapsed() / done * (self.total - self.step) if done > 0 else None

    def metric_parts(self) -> list[str]:
        return [f"{_fmt(v)} s/it" if k == "s/it" else f"{k} {_fmt(v)}" for k, v in self.metrics.items()]

    def plain_line(self) -> str:
        return SEP.join([f"{self.title} step {self.step}/{self.total}", *self.metric_parts(),
                         f"ETA {_clock(self.eta())}"])

    def live_line(self, width: int) -> Text:
        """The live line for a terminal ``width`` columns wide: never longer than ``width``; the count
        and the ETA always, then the bar, the title, the elapsed time and as many metrics as fit."""
        count, eta, elapsed = f"{self.step}/{self.total}", f"ETA {_clock(self.eta())}", _clock(self.elapsed())
        room = width - len(count) - 1 - len(eta)
        head = f"{self.title} " if room >= len(self.title) + 1 + BAR_MIN + 1 else ""
        room -= len(head)
        bar_width = min(BAR_MAX, max(BAR_MIN, room // 4)) if room >= BAR_MIN + 1 else max(0, room - 1)
        room -= bar_width + 1 if bar_width else 0
        show_elapsed = room >= len(elapsed) + 1 + 20  # the metrics keep room of their own
        room -= len(elapsed) + 1 if show_elapsed else 0
        metrics = ""
        for part in self.metric_parts():  # whole metrics, dropped from the end first
            candidate = part if not metrics else metrics + SEP + part
            if 1 + len(candidate) > room:
                break
            metrics = candidate
        text = Text(no_wrap=True, overflow="crop")
        text.append(head, style="bold")
        if bar_width:
            text.append(_bar(self.step, self.total, bar_width) + " ", style="magenta")
        text.append(count)
        if show_elapsed:
            text.append(" " + elapsed, style="yellow")
        text.append(" " + eta, style="cyan")
        if metrics:
            text.append(" " + metrics)
        text.truncate(width)
        return text


class _Line:
    """Renders the live line at the width the terminal has at each redraw."""

    def __init__(self, progress: JobProgress) -> None:
        self.progress = progress

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.progress.live_line(options.max_width)


def _bar(done: int, total: int, width: int) -> str:
    filled = width * min(done, total) / total if total > 0 else width
    full = int(filled)
    half = full < width and filled - full >= 0.5
    return "━" * full + ("╸" if half else "") + "─" * (width - full - half)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    return f"{v:.2e}" if (a and (a < 1e-3 or a >= 1e4)) else f"{v:.3f}"


def note(message: str) -> None:
    """One line on stderr, outside any progress display (what a job decided, e.g. where it resumed)."""
    Console(stderr=True, highlight=False).print(message, soft_wrap=True, markup=False)

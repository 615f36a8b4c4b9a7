"""Rich progress for long jobs (training loops, evaluation): one bar with the count, fixed metric
keys, elapsed time and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class JobProgress:
    """A bar over ``total`` units (steps, items) that shows a fixed set of metrics; ``warn`` prints
    above it (the first 20 warnings; the rest are only counted)."""

    def __init__(self, title: str, total: int, *, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True, highlight=False)
        self.total = total
        self.title = title
        self.progress: Progress | None = None
        self.task = None
        self._warned = 0

    def start(self, completed: int = 0) -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{self.title}[/]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.title, total=self.total, completed=completed, info="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is None:
            return
        info = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self.progress.update(self.task, completed=step, info=info)

    def warn(self, message: str) -> None:
        if not self.enabled:
            return
        self._warned += 1
        if self._warned <= 20:
            self.console.print(f"[yellow]warning:[/] {message}")
        elif self._warned == 21:
            self.console.print("[yellow]warning:[/] further skip warnings are counted in the metrics only")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    return f"{v:.2e}" if (a and (a < 1e-3 or a >= 1e4)) else f"{v:.3f}"

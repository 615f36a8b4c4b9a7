"""Plotting a run whose metrics file is empty (a finished run resumed into a fresh directory logs no
step) warns and writes nothing instead of failing after the final checkpoint was saved."""

from __future__ import annotations

import pytest

from tlvr_cli.train.metrics import MetricsLogger, plot_run


def test_plot_run_of_an_empty_metrics_file_warns(tmp_path):
    MetricsLogger(tmp_path).close()  # creates metrics.jsonl with no rows, as a run that logged nothing
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    with pytest.warns(UserWarning, match="no metrics logged"):
        assert plot_run(tmp_path) is None
    assert not list(tmp_path.glob("*.png"))

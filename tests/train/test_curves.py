"""curves.png: a legend tells the logged line from the smoothed one; the learning rate is drawn as logged."""

from __future__ import annotations

import json

import matplotlib.figure

from tlvr_cli.train.metrics import moving_mean, plot_metrics


def test_the_learning_rate_is_not_smoothed_and_the_lines_are_labelled(tmp_path, monkeypatch):
    ys = [float(i % 3) for i in range(20)]
    mean, window = moving_mean("train/loss", ys)
    assert window == 2 and mean[:3] == [0.0, 0.5, 1.5]
    assert moving_mean("train/lr", ys) is None and moving_mean("lr", ys) is None
    assert moving_mean("reward", ys[:7]) is None  # too short to smooth

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i + 1, "train/loss": y, "train/lr": 1e-3 * (20 - i)}) + "\n"
                               for i, y in enumerate(ys)))
    legends = []
    savefig = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        legends.extend([t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
                       for ax in fig.axes)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    png = plot_metrics(metrics, tmp_path / "curves.png", ["train/loss", "train/lr"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert legends == [["logged", "mean of the last 2"], []]

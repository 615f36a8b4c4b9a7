"""`tlvr runs compare`: the last logged values, median step time, peak memory and eval scores of each
run, matched across runs, the overlaid curves, and a one-line error for a directory that is no run."""

from __future__ import annotations

import json

import fixtures_runs as fr
import pytest

from tlvr_cli.errors import TlvrError
from tlvr_cli.runs import compare_runs, comparison_rows, default_compare_png, read_run


@pytest.fixture()
def runs(tmp_path):
    a = fr.make_run(tmp_path / "runs", "a", final=False)
    b = fr.make_run(tmp_path / "runs", "b", final=False, rows=fr.grpo_rows(20, reward0=-0.5, slope=0.05))
    fr.add_eval(a, "eval", "mvbench", [True, True, False, False], model=a / "final")
    fr.add_eval(b, "eval", "mvbench", [True, True, True, False], model=b / "final")
    fr.add_eval(b, "eval-paper", "mvbench", [True, False], model=b / "final", protocol="paper")
    cs = fr.make_run(tmp_path / "runs", "cs", job="coldstart", final=False,
                     rows=[{"step": s, "train/loss": 1.0 / s, "time/step_s": 2.0} for s in (1, 2, 3)])
    return a, b, cs


def test_summary_holds_last_values_median_step_time_and_peak_memory(runs):
    a = read_run(runs[0])
    assert a.job == "grpo" and a.steps == 12
    assert a.final == {"reward": pytest.approx(0.2), "rewards/accuracy_reward": pytest.approx(0.6),
                       "rewards/format_reward": 1.0, "completion_length": 188.0, "kl": pytest.approx(0.012)}
    assert a.step_time_s == 9.0  # the first step's 39 s (compile, warm-up) does not move the median
    assert a.peak_mem_gb == pytest.approx(71.2)
    [ev] = a.evals
    assert (ev.label, ev.benchmark, ev.protocol, ev.headline, ev.n_scored) == ("eval", "mvbench", "greedy", 50.0, 4)


def test_table_matches_metrics_and_evals_across_runs(runs, tmp_path):
    summaries, png = compare_runs(runs, tmp_path / "out" / "cmp.png")
    columns, rows = comparison_rows(summaries)
    table = {row[0]: row[1:] for row in rows}
    assert columns == ["", "a", "b", "cs"]
    assert table["job"] == ["grpo", "grpo", "coldstart"] and table["steps"] == ["12", "20", "3"]
    assert table["reward"] == ["0.2", "0.5", "–"] and table["loss"] == ["–", "–", "0.3333"]
    assert table["accuracy"] == ["0.6", "1", "–"] and table["s/step"] == ["9", "9", "2"]
    b_eval = summaries[1].evals[0]
    assert table["eval: mvbench, greedy"] == [summaries[0].evals[0].score(), b_eval.score(), "–"]
    assert b_eval.score().startswith("75.0 (")
    paper = table["eval-paper: mvbench, paper"]
    assert paper[0] == paper[2] == "–" and paper[1] == summaries[1].evals[1].score() and paper[1].startswith("50.0 (")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_prints_table_and_writes_the_png_beside_the_runs(runs, capsys):
    from tlvr_cli.cli import main

    main(["runs", "compare", *map(str, runs[:2])])
    out = capsys.readouterr().out
    png = runs[0].parent / "compare.png"
    assert default_compare_png(runs[:2]) == png and png.exists() and f"curves: {png}" in out
    assert "eval: mvbench, greedy" in out and "75.0" in out
    main(["runs", "compare", str(runs[2]), "--json", "--out", str(runs[2] / "c.png")])
    data = json.loads(capsys.readouterr().out)
    assert data["runs"][0]["final"] == {"train/loss": pytest.approx(1 / 3)} and data["curves"] == str(runs[2] / "c.png")


def test_not_a_run_dir_is_one_line(runs, tmp_path, capsys):
    from tlvr_cli.cli import main

    with pytest.raises(TlvrError, match=r"eval is not a run directory \(no config.yaml and metrics.jsonl\)$"):
        read_run(runs[0] / "eval")
    with pytest.raises(SystemExit) as exit_:
        main(["runs", "compare", str(runs[0]), str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"{tmp_path / 'missing'} does not exist" in err

"""Reports: the Init/SFT/RL table, the plot file, and clear errors for empty or missing runs."""

import json

import pytest

from sftrl_jax import cli
from sftrl_jax.errors import UserError
from sftrl_jax.evaluation import report


def _summary(task, split, rate, n=234):
    return {
        "task": task,
        "split": split,
        "recognition": False,
        "episodes": n,
        "turns": n,
        "success_rate": rate,
        "success_rate_stderr": (rate * (1 - rate) / n) ** 0.5,
    }


def make_runs(tmp_path):
    sft, rl = tmp_path / "sft", tmp_path / "rl"
    for run, arm, rates in ((sft, "sft", (0.30, 0.02)), (rl, "rl", (0.28, 0.15))):
        for step, scale in ((0, 0.0), (10, 0.5), (20, 1.0)):
            a = "init" if step == 0 else arm
            report.append_eval(
                run,
                arm=a,
                step=step,
                gflops=100.0 * step,
                summary=_summary("gp-l", "id", 0.2 + scale * (rates[0] - 0.2)),
            )
            report.append_eval(
                run,
                arm=a,
                step=step,
                gflops=100.0 * step,
                summary=_summary("gp-l", "ood-rule", 0.1 + scale * (rates[1] - 0.1)),
            )
    return sft, rl


def test_table_and_plot(tmp_path):
    sft, rl = make_runs(tmp_path)
    rows = report.load_rows([sft, rl])
    md = report.table(rows)
    assert "| gp-l | id | success_rate | 20.0% ± 2.6 | 28.0% ± 2.9 (+8.0) | 30.0% ± 3.0 (+10.0) |" in md
    assert "| gp-l | ood-rule | success_rate | 10.0% ± 2.0 | 15.0% ± 2.3 (+5.0) | 2.0% ± 0.9 (-8.0) |" in md
    assert md.index("| gp-l | id |") < md.index("| gp-l | ood-rule |")
    paths = report.report([sft, rl], tmp_path / "out")
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "success vs compute" in open(paths["markdown"]).read()


def test_table_reward_line(tmp_path):
    # Rows that carry the mean turn reward get a second line with it and its change from Init.
    for arm, step, reward in (("init", 0, -2.75), ("rl", 4, -2.5), ("sft", 9, -2.875)):
        summary = dict(_summary("gp-l", "id", 0.0, n=32), reward_mean=reward)
        report.append_eval(tmp_path / "run", arm=arm, step=step, gflops=step, summary=summary)
    md = report.table(report.load_rows([tmp_path / "run"]))
    assert "| gp-l | id | success_rate | 0.0% ± 0.0 | 0.0% ± 0.0 (+0.0) | 0.0% ± 0.0 (+0.0) |" in md
    assert "| gp-l | id | reward per turn | -2.750 | -2.500 (+0.250) | -2.875 (-0.125) |" in md
    # Rows without it (older runs) give no such line.
    assert "reward per turn" not in report.table(report.load_rows(make_runs(tmp_path / "old")))
    # The plot gets a second row of panels (reward vs compute) only when the rows carry the reward.
    from PIL import Image

    with_reward = Image.open(report.report([tmp_path / "run"], tmp_path / "out")["plot"]).size
    without = Image.open(report.report(list(make_runs(tmp_path / "old2")), tmp_path / "out2")["plot"]).size
    assert with_reward[1] == 2 * without[1]


def test_report_command(tmp_path, capsys):
    sft, rl = make_runs(tmp_path)
    assert cli.main(["report", str(sft), str(rl), "--out", str(tmp_path / "o")]) == 0
    assert "| gp-l | ood-rule |" in capsys.readouterr().out


def test_bad_run_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no evals.jsonl"):
        report.load_rows([tmp_path / "empty"])
    with pytest.raises(UserError, match="does not exist"):
        report.load_rows([tmp_path / "nope"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "evals.jsonl").write_text(json.dumps({"arm": "rl"}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"evals.jsonl:2: not valid JSON"):
        report.load_rows([tmp_path / "bad"])
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "has no evals.jsonl" in capsys.readouterr().err

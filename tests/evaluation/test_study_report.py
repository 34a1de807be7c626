"""The study report: means, seed spread, pooled standard error and direction lines over a synthetic study
(3 seeds x 4 arms x 2 compute points with known values), the plots, the CLI, and clear errors."""

import json
import math
import statistics

import pytest

from sftrl_jax import cli
from sftrl_jax.errors import UserError
from sftrl_jax.evaluation import report, study_report

SEEDS = (0, 1, 2)
EPISODES = 100
# {split: {arm: (values at step 10 per seed, values at step 20 per seed)}}; Init is step 0.
VALUES = {
    "id": {
        "init": ((0.30, 0.30, 0.30),),
        "rl": ((0.40, 0.42, 0.44), (0.50, 0.52, 0.54)),
        "grpo": ((0.35, 0.35, 0.35), (0.40, 0.40, 0.40)),
        "sft": ((0.60, 0.62, 0.64), (0.70, 0.72, 0.74)),
    },
    "ood-rule": {
        "init": ((0.10, 0.12, 0.14),),
        "rl": ((0.15, 0.16, 0.17), (0.20, 0.22, 0.24)),  # above Init beyond the error bars
        "grpo": ((0.12, 0.12, 0.12), (0.12, 0.13, 0.14)),  # within them
        "sft": ((0.05, 0.06, 0.07), (0.02, 0.03, 0.04)),  # below
    },
}
KL = {"init": (0.0,), "rl": (0.02, 0.04), "grpo": (0.01, 0.02), "sft": (0.1, 0.3)}  # + 0.001 * seed


def _summary(split, rate):
    return {
        "task": "gp-l",
        "split": split,
        "recognition": False,
        "episodes": EPISODES,
        "turns": EPISODES,
        "success_rate": rate,
        "success_rate_stderr": math.sqrt(rate * (1 - rate) / EPISODES),
    }


def make_study(root, *, base=True):
    root.mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({"task": "gp-l", "seeds": list(SEEDS)}))
    evals, kl = [], []
    for split, arms in VALUES.items():
        for arm, points in arms.items():
            for k, per_seed in enumerate(points):
                step = 0 if arm == "init" else 10 * (k + 1)
                for seed, v in zip(SEEDS, per_seed):
                    gflops = 10.0 * step + seed
                    row = report.eval_row(arm=arm, step=step, gflops=gflops, summary=_summary(split, v))
                    evals.append({**row, "seed": seed})
                    kl_value = KL[arm][k] + (0.001 * seed if arm != "init" else 0.0)
                    kl.append(
                        {
                            "seed": seed,
                            "arm": arm,
                            "step": step,
                            "gflops": gflops,
                            "split": split,
                            "kl": kl_value,
                            "kl_reverse": 2 * kl_value,
                            "prompts": 16,
                            "tokens": 400,
                        }
                    )
    (root / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (root / "kl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kl))
    if base:
        probe = {"id": {"success": 0.25, "n": 64}, "held_out_rule": {"success": 0.0625, "n": 64}}
        (root / "base.json").write_text(json.dumps({"probe": probe}))
    return root


def _table(md, heading):
    """{first cell: [cells]} of the markdown table under `## heading`."""
    lines = md.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {heading}"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _pooled(values):
    p = statistics.mean(values)
    return math.sqrt(p * (1 - p) / (len(values) * EPISODES))


def test_final_stats_and_direction(tmp_path):
    study = study_report.load(make_study(tmp_path / "study"))
    stats = study_report.final_stats(study.evals)
    assert list(stats) == [("gp-l", "id", "success_rate"), ("gp-l", "ood-rule", "success_rate")]
    ood = stats[("gp-l", "ood-rule", "success_rate")]
    assert list(ood) == ["init", "rl", "grpo", "sft"]
    for arm, s in ood.items():
        final = VALUES["ood-rule"][arm][-1]
        assert s.seeds == SEEDS and s.values == pytest.approx(final)
        assert s.mean == pytest.approx(statistics.mean(final))
        assert s.std == pytest.approx(statistics.stdev(final))
        assert s.stderr == pytest.approx(_pooled(final))
        assert s.episodes == 3 * EPISODES
    assert ood["rl"].gflops == pytest.approx(201.0)  # the mean over seeds of the last point's GFLOPs
    # Combined s.e.: each arm's the larger of std / sqrt(3) and the pooled binomial one (here the pooled one).
    d = study_report.direction(ood["init"], ood["rl"])
    se = math.hypot(_pooled(VALUES["ood-rule"]["rl"][-1]), _pooled(VALUES["ood-rule"]["init"][0]))
    assert d.diff == pytest.approx(0.10) and d.se == pytest.approx(se) and d.z == pytest.approx(0.10 / se)
    assert d.verdict == "above"
    assert study_report.direction(ood["init"], ood["grpo"]).verdict == "within"
    assert study_report.direction(ood["init"], ood["sft"]).verdict == "below"
    # The seed-to-seed standard error counts where it is the larger one.
    wide = study_report.ArmStats(arm="rl", seeds=SEEDS, values=(0.0, 0.2, 0.4), episodes=30000, gflops=1.0)
    assert wide.sem == pytest.approx(statistics.stdev(wide.values) / math.sqrt(3))


def test_curve_averages_seeds_per_point(tmp_path):
    study = study_report.load(make_study(tmp_path / "study"))
    x, y, e = study_report.curve(study.evals, task="gp-l", split="ood-rule", arm="rl")
    assert x == pytest.approx([1.0, 101.0, 201.0])  # Init first; x = mean GFLOPs over seeds
    assert y == pytest.approx([0.12, 0.16, 0.22])
    assert e == pytest.approx([0.02, 0.01, 0.02])


def test_markdown_tables(tmp_path):
    md = study_report.markdown(study_report.load(make_study(tmp_path / "study")))
    ood = _table(md, "OOD (rule)")
    assert ood["Init"] == ["12.0% ± 2.0", "1.9", "s0 10.0, s1 12.0, s2 14.0", "—", "1", "11.5%"]
    assert ood["PPO"] == ["22.0% ± 2.0", "2.4", "s0 20.0, s1 22.0, s2 24.0", "+10.0", "201", "15.0% (+3.5)"]
    assert ood["GRPO"] == ["13.0% ± 1.0", "1.9", "s0 12.0, s1 13.0, s2 14.0", "+1.0", "201", "—"]
    assert ood["SFT"] == ["3.0% ± 1.0", "1.0", "s0 2.0, s1 3.0, s2 4.0", "-9.0", "201", "3.4% (-8.1)"]
    ident = _table(md, "ID")
    assert ident["Init"][:2] == ["30.0% ± 0.0", f"{100 * _pooled((0.3,) * 3):.1f}"]
    assert ident["SFT"][3] == "+42.0" and ident["SFT"][5] == "—"  # the paper gives no GP-L ID numbers
    assert "no numbers (SPEC §4.3)" in md
    lines = {line.split(" (")[0]: line for line in md.split("\n") if line.startswith("- ")}
    assert "**above Init beyond the error bars**" in lines["- PPO"]
    assert "within the error bars" in lines["- GRPO"]
    assert "**below Init beyond the error bars**" in lines["- SFT"]
    assert "+10.0 points" in lines["- PPO"] and "-9.0 points" in lines["- SFT"]
    kl = _table(md, "KL to Init")
    assert kl["PPO"] == ["0.0410 ± 0.0010", "0.0410 ± 0.0010", "0.0820", "0.0820"]
    assert kl["SFT"][1] == "0.3010 ± 0.0010" and kl["Init"][0] == "0.0000 ± 0.0000"
    base = _table(md, "Base model")
    assert base["probe / id"] == ["0.25", "64"] and base["probe / held_out_rule"] == ["0.0625", "64"]


def test_report_writes_plots(tmp_path):
    paths = study_report.report(make_study(tmp_path / "study", base=False), tmp_path / "out")
    assert set(paths) == {"markdown", "plot", "kl_plot"}
    for key in ("plot", "kl_plot"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(paths["markdown"]).read()
    assert "Base model" not in md and "![success vs KL to Init](kl.png)" in md
    points = study_report.kl_points(study_report.load(tmp_path / "study"))
    assert len(points) == 2 * 3 * (1 + 2 + 2 + 2)  # every KL row found its evaluation


def test_report_command_on_a_study(tmp_path, capsys):
    study = make_study(tmp_path / "study")
    assert cli.main(["report", str(study)]) == 0
    assert "## OOD (rule)" in capsys.readouterr().out
    assert (study / "report" / "report.md").exists() and (study / "report" / "kl.png").stat().st_size > 0
    assert cli.main(["report", str(study), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "curves.png").stat().st_size > 0
    assert cli.main(["report", str(study), str(study)]) == 2
    assert "one study at a time" in capsys.readouterr().err


def test_bad_study_folders(tmp_path, capsys):
    study = make_study(tmp_path / "study")
    lines = (study / "evals.jsonl").read_text().split("\n")
    (study / "evals.jsonl").write_text("\n".join([*lines[:2], "{oops", *lines[2:]]))
    assert cli.main(["report", str(study)]) == 2
    assert f"{study / 'evals.jsonl'}:3: not valid JSON" in capsys.readouterr().err
    row = json.loads(lines[0])
    del row["seed"]
    (study / "evals.jsonl").write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"evals.jsonl:2: missing seed"):
        study_report.load(study)
    (study / "evals.jsonl").write_text(json.dumps({**json.loads(lines[0]), "value": "12%"}) + "\n")
    with pytest.raises(UserError, match=r"evals.jsonl:1: value must be a number, got '12%'"):
        study_report.load(study)
    (study / "kl.jsonl").write_text('{"seed": 0, "arm": "ppo", "step": 0, "gflops": 0, "split": "id", "kl": 0}\n')
    (study / "evals.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(UserError, match=r"kl.jsonl:1: unknown arm 'ppo'"):
        study_report.load(study)
    (study / "evals.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no evaluations yet"):
        study_report.load(study)
    (study / "evals.jsonl").unlink()
    assert cli.main(["report", str(study)]) == 2
    assert "has no evals.jsonl" in capsys.readouterr().err
    (study / "study.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="study.json: expected a JSON object"):
        study_report.load(study)


def test_run_table_grpo_column_only_with_grpo_rows(tmp_path):
    rows = [
        {**report.eval_row(arm=arm, step=s, gflops=s, summary=_summary("ood-rule", v)), "run": "r"}
        for arm, s, v in (("init", 0, 0.1), ("rl", 5, 0.15), ("sft", 5, 0.02))
    ]
    assert report.table(rows) == (
        "| task | split | metric | Init | RL | SFT |\n"
        "|---|---|---|---|---|---|\n"
        "| gp-l | ood-rule | success_rate | 10.0% ± 3.0 | 15.0% ± 3.6 (+5.0) | 2.0% ± 1.4 (-8.0) |\n"
    )
    grpo = {**report.eval_row(arm="grpo", step=5, gflops=5, summary=_summary("ood-rule", 0.12)), "run": "g"}
    assert report.table([*rows, grpo]) == (
        "| task | split | metric | Init | RL | GRPO | SFT |\n"
        "|---|---|---|---|---|---|---|\n"
        "| gp-l | ood-rule | success_rate | 10.0% ± 3.0 | 15.0% ± 3.6 (+5.0) | 12.0% ± 3.2 (+2.0) | 2.0% ± 1.4 (-8.0) |\n"
    )


def test_curves_and_kl_points_keep_each_metric_apart():
    """A study writes rule_use rows beside success rows for the same points: a curve reads one metric,
    the KL plot pairs KL with the success rate."""
    from sftrl_jax.evaluation import study_report as sr

    evals = []
    for seed in (0, 1):
        for arm, step, g, succ, use in (
            ("init", 0, 1.0, 0.1, 0.7),
            ("sft", 4, 2.0, 0.05, 0.5),
            ("sft", 8, 3.0, 0.02, 0.4),
        ):
            base = dict(seed=seed, arm=arm, step=step, gflops=g, task="gp-l", split="ood-rule", episodes=10)
            evals += [{**base, "metric": "success_rate", "value": succ}, {**base, "metric": "rule_use", "value": use}]
    x, y, _ = sr.curve(evals, task="gp-l", split="ood-rule", arm="sft", metric="rule_use")
    assert x == [1.0, 2.0, 3.0] and y == pytest.approx([0.7, 0.5, 0.4])
    _, y, _ = sr.curve(evals, task="gp-l", split="ood-rule", arm="sft", metric="success_rate")
    assert y == pytest.approx([0.1, 0.05, 0.02])
    kl = [dict(seed=0, arm="sft", step=8, gflops=3.0, split="ood-rule", kl=0.01)]
    study = sr.Study(dir=".", meta={}, evals=evals, kl=kl, base=None)
    assert sr.kl_points(study) == [dict(seed=0, arm="sft", step=8, split="ood-rule", kl=0.01, value=0.02)]


def test_the_table_lists_the_headline_before_rule_use_on_every_split():
    from sftrl_jax.evaluation import report

    rows = [
        dict(arm="init", step=0, gflops=1.0, task="gp-l", split=split, metric=m, value=0.5, stderr=0.1, episodes=4)
        for split in ("ood-rule", "id")
        for m in ("rule_use", "success_rate")
    ]
    lines = [line.split(" | ")[1:3] for line in report.table(rows).splitlines()[2:]]
    assert lines == [["id", "success_rate"], ["id", "rule_use"], ["ood-rule", "success_rate"], ["ood-rule", "rule_use"]]

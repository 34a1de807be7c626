"""`sftrl demo` end to end at toy sizes (the real demo is `make demo`; see docs/RESULTS.md)."""

import json

import pytest

from sftrl_jax import cli
from sftrl_jax.evaluation import report

TINY = [
    "sft.examples=64",
    "sft.warmup_steps=3",
    "sft.batch_size=4",
    "rl.updates=1",
    "rl.num_envs=4",
    "rl.steps_per_update=2",
    "rl.samples_per_step=8",
    "rl.micro_batch=8",
    "rl.max_new_tokens=8",
    "eval_episodes=4",
    "progress=false",
]


@pytest.mark.slow  # 69 s cold; the study it copies stays in the default suite (test_study)
def test_demo_runs_all_stages_with_equal_compute_arms(tmp_path, capsys):
    run = tmp_path / "demo"
    assert cli.main(["demo", f"run_dir={run}", *TINY]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    for stage in ("1/5 data", "2/5 SFT warm-up -> Init", "3/5 RL arm (PPO)", "4/5 SFT arm with the same compute"):
        assert stage in out and stage in summary["stage_seconds"]
    # The SFT arm is sized to the RL arm's compute (whole SFT steps: within one step's worth).
    g = summary["gflops"]
    assert 0 < g["init"] < g["rl"]
    per_step = g["init"] / 3
    assert abs(g["sft"] - g["rl"]) <= per_step / 2 + 1e-9, g
    assert summary["sft_arm_steps"] == round((g["rl"] - g["init"]) / per_step)
    # Every arm evaluated on both splits with the requested number of episodes; the table printed.
    rows = report.load_rows([str(run / "sft"), str(run / "rl")])
    seen = {(r["arm"], r["split"]) for r in rows}
    assert seen == {(a, s) for a in ("init", "rl", "sft") for s in ("id", "ood-rule")}
    assert all(r["episodes"] == 4 for r in rows)
    assert "| gp-l | id | success_rate |" in out and "| gp-l | ood-rule | success_rate |" in out
    assert (run / "report" / "report.md").exists() and (run / "report" / "curves.png").stat().st_size > 0


def test_demo_refuses_other_tasks_and_prompts(tmp_path, capsys):
    assert cli.main(["demo", f"run_dir={tmp_path}", "task=virl-l"]) == 2
    assert "gp-l" in capsys.readouterr().err
    assert cli.main(["demo", f"run_dir={tmp_path}", "prompt=long"]) == 2
    assert "short, paper" in capsys.readouterr().err

"""`sftrl demo`: the study's code on configs/demo/cpu.yaml (the real demo is `make demo`; see
docs/RESULTS.md), end to end at toy sizes, and the config it reads."""

import json
from pathlib import Path

import pytest

from sftrl_jax import cli, config, study

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "cpu.yaml"

TINY = [
    "warmup.examples=64",
    "warmup.steps=3",
    "warmup.batch_size=4",
    "arms.updates=1",
    "arms.num_envs=4",
    "arms.steps_per_update=2",
    "arms.samples_per_step=8",
    "arms.micro_batch=8",
    "arms.max_new_tokens=8",
    "eval_episodes=4",
    "kl_prompts=2",
    "progress=false",
]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # ~70 s cold; the study it runs stays in the default suite (test_study)
def test_demo_runs_all_stages_with_equal_compute_arms(tmp_path, capsys):
    run = tmp_path / "demo"
    assert cli.main(["demo", f"run_dir={run}", *TINY]) == 0
    out = capsys.readouterr().out
    for stage in ("seed 0: expert data", "seed 0: SFT warm-up from the base -> Init", "seed 0: rl arm (ppo)"):
        assert stage in out, stage
    assert "seed 0: SFT arm (" in out and "grpo" not in out and "probing the base" not in out
    assert not (run / "base.json").exists()  # probe_episodes: 0
    # The SFT arm is sized to the RL arm's compute (whole SFT steps: within one step's worth).
    evals = _rows(run / "evals.jsonl")
    uses = [r for r in evals if r["metric"] == "rule_use"]
    evals = [r for r in evals if r["metric"] == "success_rate"]
    g = {r["arm"]: r["gflops"] for r in evals if r["split"] == "id"}
    assert 0 < g["init"] < g["rl"]
    per_step = g["init"] / 3
    assert abs(g["sft"] - g["rl"]) <= per_step / 2 + 1e-9, g
    sft_steps = {r["step"] for r in evals if r["arm"] == "sft"}
    assert sft_steps == {round((g["rl"] - g["init"]) / per_step)}
    # Every arm evaluated on both splits with the requested number of episodes; the table printed.
    seen = {(r["arm"], r["split"]) for r in evals}
    assert seen == {(a, s) for a in ("init", "rl", "sft") for s in ("id", "ood-rule")} and len(evals) == len(seen)
    assert all(r["episodes"] == 4 and r["seed"] == 0 for r in evals)
    assert "| task | split | metric | Init | RL | SFT |" in out
    assert "| gp-l | id | success_rate |" in out and "| gp-l | ood-rule | success_rate |" in out
    assert "| gp-l | ood-rule | rule_use |" in out  # both endpoints, with error bars
    assert {(r["arm"], r["split"]) for r in uses} == seen and len(uses) == len(seen)
    assert f"(SFT arm: {sft_steps.pop()} steps to match RL)" in out and "demo finished in" in out
    assert {(r["arm"], r["split"]) for r in _rows(run / "kl.jsonl")} == seen
    assert (run / "report" / "report.md").exists() and (run / "report" / "curves.png").stat().st_size > 0


def test_demo_refuses_other_tasks_and_prompts(tmp_path, capsys):
    assert cli.main(["demo", f"run_dir={tmp_path}", "task=virl-l"]) == 2
    assert "gp-l" in capsys.readouterr().err
    assert cli.main(["demo", f"run_dir={tmp_path}", "prompt=long"]) == 2
    assert "short, paper" in capsys.readouterr().err


def test_demo_is_the_study_on_its_config(tmp_path, monkeypatch, capsys):
    """`sftrl demo` reads configs/demo/cpu.yaml through the study's schema (overrides and --config as
    `sftrl study`), runs `study.run` and ends with `study.final_tables`; a bad key exits 2 in one line."""
    cfg = config.load(study.StudyConfig, DEMO)
    assert DEMO.read_text().splitlines()[0].startswith("# sftrl demo")
    # one seed, the PPO and SFT arms, no base probe; the demo's work: 2000 examples, 50 warm-up steps,
    # 4 PPO updates of 16 envs x 6 turns, 100 hands per split in batches of 32
    assert cfg.seeds == (0,) and cfg.arms.arms == ("rl", "sft") and cfg.arms.points == 1 and cfg.probe_episodes == 0
    assert (cfg.warmup.examples, cfg.warmup.steps, cfg.arms.updates, cfg.arms.num_envs) == (2000, 50, 4, 16)
    assert (cfg.arms.steps_per_update, cfg.eval_episodes, cfg.eval_batch) == (6, 100, 32)
    seen = []
    monkeypatch.setattr(study, "run", lambda c: seen.append(c) or {"minutes": 0.1, "peak_rss_mb": 1, "markdown": "r"})
    monkeypatch.setattr(study, "final_tables", lambda c: "| task | split | metric | Init | RL | SFT |")
    assert cli.main(["demo", f"run_dir={tmp_path}", "arms.updates=8"]) == 0
    assert seen[-1] == config.load(study.StudyConfig, DEMO, [f"run_dir={tmp_path}", "arms.updates=8"])
    assert "| Init | RL | SFT |" in capsys.readouterr().out
    study_config = ROOT / "configs" / "study" / "gp_l_small.yaml"
    assert cli.main(["demo", "--config", str(study_config), f"run_dir={tmp_path}"]) == 0
    assert seen[-1].seeds == (0, 1, 2) and seen[-1].arms.arms == ("rl", "grpo", "sft")
    capsys.readouterr()
    assert cli.main(["demo", f"run_dir={tmp_path}", "rl.updates=6"]) == 2  # the demo's old section: now `arms`
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cpu.yaml" in err[0] and "unknown config key 'rl'" in err[0] and "arms" in err[0], err
    assert len(seen) == 2


def test_final_tables_give_each_arms_last_point_and_its_compute(tmp_path):
    """What the demo prints at the end: one Init / RL / SFT table and the compute line."""
    rows = []
    for arm, step, gflops, values in (
        ("init", 0, 1.0, (0.10, 0.02)),
        ("rl", 2, 2.0, (0.11, 0.03)),
        ("rl", 4, 3.0, (0.13, 0.04)),
        ("sft", 20, 3.04, (0.09, 0.01)),
    ):
        for split, v in zip(("id", "ood-rule"), values):
            rows.append(
                dict(arm=arm, step=step, gflops=gflops, task="gp-l", split=split, metric="success_rate", value=v)
                | dict(stderr=0.01, episodes=100, seed=0)
            )
    (tmp_path / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config.load(study.StudyConfig, DEMO, [f"run_dir={tmp_path}"])
    text = study.final_tables(cfg)
    assert "| task | split | metric | Init | RL | SFT |" in text
    assert "| gp-l | id | success_rate | 10.0% ± 1.0 | 13.0% ± 1.0 (+3.0) | 9.0% ± 1.0 (-1.0) |" in text
    assert "| gp-l | ood-rule | success_rate | 2.0% ± 1.0 | 4.0% ± 1.0 (+2.0) | 1.0% ± 1.0 (-1.0) |" in text
    assert text.rstrip().endswith("compute (GFLOPs): Init 1.0, RL 3.0, SFT 3.0 (SFT arm: 20 steps to match RL)")

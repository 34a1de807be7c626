"""Failure analysis: first-answer rule use is classified against the re-dealt evaluation hands."""

import json

from sftrl_jax import envs
from sftrl_jax.envs.general_points import expert
from sftrl_jax.evaluation import failures


def test_rule_use_classifies_rule_as_10_and_other(tmp_path):
    env = envs.make("gp-l", split="ood-rule")
    rows = []
    for sid in range(6):
        _, info = env.reset(seed=42 * 1_000_003 + sid)
        as_10 = [min(v, 10) for v in info["numbers"]]
        numbers = {0: info["numbers"], 1: info["numbers"][::-1], 2: as_10, 3: as_10, 4: as_10, 5: None}[sid]
        text = "garbage" if numbers is None else expert.format_answer(info["cards"], numbers, "1+2", 24)
        rows.append({"sample_id": sid, "turn": 0, "output": text})
        rows.append({"sample_id": sid, "turn": 1, "output": "ignored: not a first answer"})
    path = tmp_path / "turns.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = failures.rule_use(str(path), task="gp-l", split="ood-rule")
    assert got == {"rule": 2 / 6, "as_10": 3 / 6, "other": 1 / 6, "n": 6}
    # on the ID split the rule is J/Q/K = 10: the same as-10 answers follow it
    env_id = envs.make("gp-l", split="id")
    _, info = env_id.reset(seed=42 * 1_000_003)
    path.write_text(
        json.dumps({"sample_id": 0, "turn": 0, "output": expert.format_answer(info["cards"], info["numbers"], "1", 24)})
        + "\n"
    )
    assert failures.rule_use(str(path), task="gp-l", split="id")["rule"] == 1.0


def test_outcomes_are_shares_of_graded_turns(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"turns/CORRECT": 1, "turns/ILLEGAL_FORMULA": 3, "turns/STEP_LIMIT": 9}))
    got = failures.outcomes(str(path))
    assert got["CORRECT"] == 0.25 and got["ILLEGAL_FORMULA"] == 0.75 and sum(got.values()) == 1.0

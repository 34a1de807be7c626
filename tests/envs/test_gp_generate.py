"""`generate_gp_sft`: the reference conversation JSON with expert answers (and images for gp-vl)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sftrl_jax.data.generate import generate_gp_sft
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.general_points import verifier


def _check(examples, vision):
    for ex in examples:
        human, gpt = ex["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n[Task Description]" if vision else "[Task Description]")
        assert ("image" in ex) == vision


def test_gp_l_file(tmp_path):
    out = tmp_path / "gp_l.json"
    stats = generate_gp_sft("gp-l", "ood-rule", 6, out, seed=3)
    assert stats["examples"] == 6 and stats["images"] == 0
    examples = json.loads(out.read_text())
    assert len(examples) == 6 and len({e["id"] for e in examples}) == 6
    _check(examples, vision=False)
    for ex in examples:
        cards = prompt_cards(ex["conversations"][0]["value"])
        values = [{"A": 1, "J": 11, "Q": 12, "K": 13}.get(c) or int(c) for c in cards]
        assert verifier.score(ex["conversations"][1]["value"], verifier.Puzzle(values, cards)).reward == 5
    again = tmp_path / "again.json"
    generate_gp_sft("gp-l", "ood-rule", 6, again, seed=3)
    assert again.read_text() == out.read_text()  # same seed, same file


def prompt_cards(prompt: str) -> list[str]:
    line = next(line for line in prompt.splitlines() if line.startswith("Cards: "))
    return [c.strip().strip("'") for c in line[len("Cards: [") : -1].split(",")]


def test_short_template_and_dealt_order(tmp_path):
    from sftrl_jax.envs.general_points import expert, prompts

    out = tmp_path / "short.json"
    template = str(prompts.SHORT_TEMPLATE)
    stats = generate_gp_sft("gp-l", "train", 20, out, seed=0, dealt_order=True, env_options={"template": template})
    assert stats["dealt_order"] is True
    in_order = 0
    for ex in json.loads(out.read_text()):
        prompt, answer = (turn["value"] for turn in ex["conversations"])
        assert prompt.startswith("[Input]\nCards: [") and "'J', 'Q', and 'K' count as '10'." in prompt
        line = prompt.splitlines()[1]
        cards = [c.strip().strip("'") for c in line[len("Cards: [") : line.index("]")].split(",")]
        values = [{"A": 1, "J": 10, "Q": 10, "K": 10}.get(c) or int(c) for c in cards]
        assert verifier.score(answer, verifier.Puzzle(values, cards)).reward == 5
        in_order += expert.numbers_in(answer.split('"formula": "')[1].split("=")[0]) == values
    assert in_order >= 8  # ~60% of hands have a solution in dealt order


def test_revision_examples_fail_first_then_answer(tmp_path):
    from sftrl_jax import envs

    out = tmp_path / "rev.json"
    stats = generate_gp_sft("gp-l", "train", 40, out, seed=1, dealt_order=True, revisions=0.5)
    examples = json.loads(out.read_text())
    revised = [e for e in examples if len(e["conversations"]) == 4]
    assert stats["revisions"] == len(revised) and 10 <= len(revised) <= 30
    assert all(len(e["conversations"]) in (2, 4) for e in examples)
    plain = generate_gp_sft("gp-l", "train", 40, tmp_path / "plain.json", seed=1, dealt_order=True)
    assert plain["revisions"] == 0
    finals = [e["conversations"][-1]["value"] for e in json.loads((tmp_path / "plain.json").read_text())]
    assert [e["conversations"][-1]["value"] for e in examples] == finals  # same hands, same expert answers
    for ex in revised:
        prompt, failed, feedback, answer = (t["value"] for t in ex["conversations"])
        assert [t["from"] for t in ex["conversations"]] == ["human", "gpt", "human", "gpt"]
        assert [t.get("loss", True) for t in ex["conversations"]] == [True, False, True, True]  # the try is context
        cards = prompt_cards(prompt)
        env = envs.make("gp-l", split="train")
        env.reset(options={"cards": cards})
        obs, reward, terminated, truncated, _ = env.step(failed)
        assert reward == -1 and not terminated and obs["text"] == feedback
        assert feedback.startswith("You failed this trial because ")
        assert failed.splitlines()[:3] == answer.splitlines()[:3]  # same cards and numbers, other formula
        assert failed != answer
        _, reward, terminated, *_ = env.step(answer)
        assert reward == 5 and terminated
    with pytest.raises(EnvError, match="revisions"):
        generate_gp_sft("gp-l", "train", 2, tmp_path / "x.json", revisions=1.5)


def test_revisions_with_several_failed_attempts_replay_in_the_env(tmp_path):
    from sftrl_jax import envs

    out = tmp_path / "rev4.json"
    stats = generate_gp_sft("gp-l", "train", 60, out, seed=2, dealt_order=True, revisions=1.0, max_failed=4)
    examples = json.loads(out.read_text())
    assert stats["revisions"] == 60 and stats["max_failed"] == 4
    n_failed = [(len(e["conversations"]) - 2) // 2 for e in examples]
    assert set(n_failed) == {1, 2, 3, 4}  # uniform over 1..4: all occur in 60 examples
    for ex in examples:
        turns = ex["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert [t.get("loss", True) for t in turns[1::2]] == [False] * (len(turns) // 2 - 1) + [True]
        env = envs.make("gp-l", split="train")
        env.reset(options={"cards": prompt_cards(turns[0]["value"])})
        answers = [t["value"] for t in turns[1::2]]
        assert len(set(answers)) == len(answers)  # every attempt differs
        for failed, feedback in zip(answers[:-1], turns[2::2]):
            obs, reward, terminated, truncated, _ = env.step(failed)  # the env's own feedback, in order
            assert reward == -1 and not (terminated or truncated) and obs["text"] == feedback["value"]
        _, reward, terminated, *_ = env.step(answers[-1])
        assert reward == 5 and terminated
    with pytest.raises(EnvError, match=r"max_failed must be an integer in 1\.\.4"):
        generate_gp_sft("gp-l", "train", 2, tmp_path / "x.json", revisions=0.5, max_failed=5)


def test_gp_vl_file_with_images(tmp_path):
    out = tmp_path / "vl" / "train.json"
    stats = generate_gp_sft("gp-vl", "train", 3, out, seed=0)
    assert stats["images"] == 3
    examples = json.loads(out.read_text())
    _check(examples, vision=True)
    assert [e["image"] for e in examples] == ["images/000000.png", "images/000001.png", "images/000002.png"]
    for ex in examples:
        with Image.open(out.parent / ex["image"]) as img:
            assert img.size == (1200, 1200)
        answer = verifier.parse_answer(ex["conversations"][1]["value"])
        assert len(answer.cards) == 4 and answer.formula


def test_bad_arguments(tmp_path):
    with pytest.raises(EnvError, match="unknown GeneralPoints variant 'gp'"):
        generate_gp_sft("gp", "train", 2, tmp_path / "x.json")
    with pytest.raises(EnvError, match="gp-vl only"):
        generate_gp_sft("gp-l", "ood-visual", 2, tmp_path / "x.json")
    with pytest.raises(EnvError, match="positive integer"):
        generate_gp_sft("gp-l", "train", 0, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_diverse_rules_deal_and_answer_under_other_stated_rules_never_the_ood_one(tmp_path):
    """`diverse_rules`: that share of examples states another J/Q/K rule in the template's sentence and
    is answered under it; the rule-OOD split's 11/12/13 never appears; 0 leaves the file as it was."""
    import re

    from sftrl_jax.envs.general_points import answer as answer_lib

    out = tmp_path / "d.json"
    stats = generate_gp_sft("gp-l", "train", 300, out, seed=1, dealt_order=True, revisions=0.5, diverse_rules=0.5)
    examples = json.loads(out.read_text())
    n_other = 0
    for ex in examples:
        prompt, answer = ex["conversations"][0]["value"], ex["conversations"][-1]["value"]
        m = re.search(r"'J', 'Q', and 'K' count as '(\d+)'(?:, '(\d+)', and '(\d+)' respectively)?\.", prompt)
        rule = (int(m[1]),) * 3 if m[2] is None else (int(m[1]), int(m[2]), int(m[3]))
        assert rule != (11, 12, 13)
        n_other += rule != (10, 10, 10)
        cards = prompt_cards(prompt)
        values = [rule[{"J": 0, "Q": 1, "K": 2}[c]] if c in "JQK" else {"A": 1}.get(c) or int(c) for c in cards]
        assert [int(v) for v in answer_lib.parse_answer(answer).numbers] == values
        assert verifier.score(answer, verifier.Puzzle(values, cards)).reward == 5
    assert stats["diverse_rule_examples"] >= n_other and 0.4 < stats["diverse_rule_examples"] / 300 < 0.6
    assert stats["distinct_rules"] > 50
    plain, zero = tmp_path / "plain.json", tmp_path / "zero.json"
    generate_gp_sft("gp-l", "train", 40, plain, seed=1, revisions=0.5)
    generate_gp_sft("gp-l", "train", 40, zero, seed=1, revisions=0.5, diverse_rules=0.0)
    assert plain.read_text() == zero.read_text()
    with pytest.raises(EnvError, match="diverse_rules must be a fraction"):
        generate_gp_sft("gp-l", "train", 4, tmp_path / "x.json", diverse_rules=1.5)

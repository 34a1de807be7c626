"""GeneralPoints env: splits, prompts, multi-turn episodes, truncation, options, errors, expert, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftrl_jax import envs
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.general_points import expert, metrics, prompts, solver, verifier


def answer(info, formula, cards=None):
    cards = info["cards"] if cards is None else cards
    return expert.format_answer(cards, info["numbers"], formula, info["target"])


def test_gp_l_prompt_and_info():
    env = envs.make("gp-l", split="train")
    obs, info = env.reset(seed=0, options={"cards": ["A", "3", "K", "10"]})
    assert obs["image"] is None
    text = obs["text"]
    for section in ("[Task Description]", "[Input]", "[Output]"):
        assert section in text
    assert "Cards: ['A', '3', 'K', '10']" in text
    assert text.count("'J', 'Q', and 'K' count as '10'.") == 2 and "24" in text
    assert info["cards"] == ["A", "3", "K", "10"] and info["numbers"] == [1, 3, 10, 10]
    assert info["solutions"] == list(solver.solutions((1, 3, 10, 10)))
    assert info["verify_message"] is None and info["remaining_steps"] == 5 and info["turn"] == 0
    assert info["target"] == 24 and info["is_success"] is False and len(info["suits"]) == 4


def test_ood_rule_prompt_and_values():
    env = envs.make("gp-l", split="ood-rule")
    obs, info = env.reset(seed=3)
    assert "'J', 'Q', and 'K' count as '11', '12', and '13' respectively." in obs["text"]
    assert any(c in ("J", "Q", "K") for c in info["cards"]) and max(info["numbers"]) >= 11
    _, info = env.reset(options={"cards": ["J", "Q", "K", "A"]})
    assert info["numbers"] == [11, 12, 13, 1]


def test_face_values_option_states_and_scores_another_rule():
    env = envs.make("gp-l", split="train", face_values=[3, 7, 12])
    obs, info = env.reset(options={"cards": ["J", "Q", "K", "2"]})
    assert "'J', 'Q', and 'K' count as '3', '7', and '12' respectively." in obs["text"]
    assert info["numbers"] == [3, 7, 12, 2] and info["solutions"] == list(solver.solutions((3, 7, 12, 2)))
    wrong = expert.format_answer(info["cards"], [10, 10, 10, 2], "10+10+2+2", 24)  # the ID rule's values
    assert env.step(wrong)[1] < 0
    _, reward, terminated, _, _ = env.step(answer(info, info["solutions"][0]))
    assert reward == 5 and terminated
    same = envs.make("gp-l", split="train", face_values=(5, 5, 5)).reset(seed=1)[0]["text"]
    assert "'J', 'Q', and 'K' count as '5'." in same
    # the paper's two rules are the same as their face_values: same text, same deal
    for split, values in (("train", (10, 10, 10)), ("ood-rule", (11, 12, 13))):
        a, b = envs.make("gp-l", split=split), envs.make("gp-l", split=split, face_values=values)
        assert a.face_card_msg == b.face_card_msg
        for seed in range(20):
            assert a.reset(seed=seed) == b.reset(seed=seed)
    for bad in ([1, 2], [0, 5, 5], [True, 2, 3], "11,12,13", [1, 2, 14]):
        with pytest.raises(EnvError, match="option 'face_values' must be three integers 1..13"):
            envs.make("gp-l", face_values=bad)


def test_gp_vl_splits_suits_and_prompt():
    expected = {"train": {"S", "C"}, "id": {"S", "C"}, "ood-rule": {"S", "C"}, "ood-visual": {"H", "D"}}
    for split, suits in expected.items():
        env = envs.make("gp-vl", split=split)
        seen = set()
        for seed in range(12):
            obs, info = env.reset(seed=seed)
            seen |= set(info["suits"])
        assert seen == suits, split
        assert obs["image"].size == (1200, 1200)
        assert "[Input]" not in obs["text"] and "Cards:" not in obs["text"] and "image" in obs["text"]
        if split == "ood-rule":
            assert max(info["numbers"]) >= 11
        else:
            assert max(info["numbers"]) <= 10


def test_seed_fixes_the_hand():
    env = envs.make("gp-l")
    _, a = env.reset(seed=11)
    _, b = env.reset(seed=11)
    _, c = env.reset()  # continues the seeded stream
    _, d = envs.make("gp-l").reset(seed=11)
    assert a["cards"] == b["cards"] == d["cards"] and a["suits"] == b["suits"] == d["suits"]
    assert (c["cards"], c["suits"]) != (a["cards"], a["suits"])


def test_episode_wrong_wrong_right():
    env = envs.make("gp-l")
    _, info = env.reset(options={"cards": ["A", "A", "3", "6"]})
    obs, r, term, trunc, info = env.step(answer(info, "6*(3+1)"))
    assert (r, term, trunc) == (-2, False, False)
    assert obs["text"] == "You failed this trial because you didn't use numbers: [1]." and obs["image"] is None
    assert (
        info["verify_message"] == "you didn't use numbers: [1]." and info["remaining_steps"] == 4 and info["turn"] == 1
    )
    assert info["outcome"] == "INCORRECT_NUMBER" and info["reward_breakdown"] == [(-2.0, "you didn't use numbers: [1]")]
    obs, r, term, trunc, info = env.step("I give up")
    assert (r, term, trunc) == (-3, False, False) and obs["text"] == "You failed this trial because illegal characters."
    obs, r, term, trunc, info = env.step(answer(info, "6*(3+1)*1"))
    assert (r, term, trunc) == (5, True, False)
    assert info["is_success"] and info["verify_message"] == "Correct solution." and obs["text"] == ""
    with pytest.raises(EnvError, match="episode is over after 3 turns"):
        env.step("again")


def test_five_wrong_then_truncation():
    env = envs.make("gp-l", split="id")
    _, info = env.reset(seed=5)
    rewards = []
    for turn in range(1, 6):
        obs, r, term, trunc, info = env.step("no idea")
        rewards.append(r)
        assert not term and not trunc and info["remaining_steps"] == 5 - turn
    obs, r, term, trunc, info = env.step(answer(info, info["solutions"][0]))  # not graded
    assert (r, term, trunc) == (-1, False, True)
    assert info["verify_message"] == "step_limit_reached" and info["outcome"] == "STEP_LIMIT"
    assert info["turn"] == 6 and info["remaining_steps"] == -1 and not info["is_success"]
    assert rewards == [-3] * 5
    with pytest.raises(EnvError, match="reset"):
        env.step("more")
    env.reset()  # a new episode starts cleanly
    assert env.step("x")[4]["turn"] == 1


@pytest.mark.parametrize("penalty", [0.0, -2.0])
def test_repeat_penalty_adds_to_repeated_graded_answers_only(penalty):
    env = envs.make("gp-l", repeat_penalty=penalty)
    _, info = env.reset(options={"cards": ["A", "A", "3", "6"]})
    wrong, other = answer(info, "6*3+1+1"), answer(info, "6*3+1-1")  # -1 each: legal, wrong value
    steps = [env.step(a) for a in (wrong, wrong, "no formula", "no formula", other, wrong)]
    rewards = [s[1] for s in steps]
    assert [s[4]["repeated"] for s in steps] == [False, True, False, False, False, False]  # 6th: ungraded
    assert rewards == [-1, -1 + penalty, -3, -3, -1, -1]  # 6th call: the step limit, not graded
    assert steps[1][0]["text"] == steps[0][0]["text"]  # the feedback is the verifier's, unchanged
    breakdown = steps[1][4]["reward_breakdown"]
    assert (breakdown[-1] == (penalty, "repeated an earlier answer")) == bool(penalty)
    _, info = env.reset(options={"cards": ["A", "A", "3", "6"]})
    assert env.step(wrong)[1] == -1  # a new episode forgets the earlier answers


def test_verify_iter_and_target_options():
    env = envs.make("gp-l", verify_iter=1, target=10)
    _, info = env.reset(options={"cards": ["A", "2", "3", "4"]})
    assert "10 points" in env.reset(options={"cards": ["A", "2", "3", "4"]})[0]["text"]
    assert "1+2+3+4" in info["solutions"]
    assert env.step(answer(info, "1+2+3+5"))[1] == -4  # 5 is not a card, 4 is unused
    assert env.step("x")[1:4] == (-1, False, True)


def test_vl_misread_and_recognition():
    env = envs.make("gp-vl")
    _, info = env.reset(options={"cards": ["A", "A", "3", "6"]})
    obs, r, *_, info = env.step(answer(info, "6*(3+1)*1", cards=["A", "A", "3", "5"]))
    assert r == -1.5 and obs["text"] == "You failed this trial because you recognized wrong cards"
    assert info["recognized_cards"] == ["A", "A", "3", "5"] and info["outcome"] == "INCORRECT_VISION"
    assert env.step(answer(info, "6*(3+1)*1", cards=["6", "3", "A", "A"]))[1] == 5


def test_exact_option_and_float_reference():
    hand = {"cards": ["3", "3", "8", "8"]}
    exact, floaty = envs.make("gp-l"), envs.make("gp-l", exact=False)
    _, info = exact.reset(options=hand)
    floaty.reset(options=hand)
    text = answer(info, "8/(3-8/3)")
    assert exact.step(text)[1] == 5
    _, r, term, _, info = floaty.step(text)
    assert (r, term, info["verify_message"]) == (0, False, ".")


def test_render_method_and_reset_options():
    env = envs.make("gp-l")
    with pytest.raises(EnvError, match="reset"):
        env.step("x")
    _, info = env.reset(options={"cards": ["KS", "QH", "3C", "AD"]})
    assert info["suits"] == ["S", "H", "C", "D"] and env.render().size == (1200, 1200)
    with pytest.raises(EnvError, match=r"cannot make 24.*allow_unsolvable"):
        env.reset(options={"cards": ["A", "A", "A", "A"]})
    _, info = env.reset(options={"cards": ["A", "A", "A", "A"], "allow_unsolvable": True})
    assert info["solutions"] == [] and env.step(answer(info, "1+1+1+1"))[1] == -1
    with pytest.raises(EnvError, match="unknown reset option 'card'"):
        env.reset(options={"card": ["A", "3", "K", "10"]})
    with pytest.raises(EnvError, match="bad card 'X' at position 1"):
        env.reset(options={"cards": ["A", "X", "K", "10"]})


def test_bad_construction_errors():
    with pytest.raises(EnvError, match="unknown split 'ood'"):
        envs.make("gp-l", split="ood")
    with pytest.raises(EnvError, match="unknown environment 'gp'"):
        envs.make("gp")
    with pytest.raises(EnvError, match="'ood-visual'.*gp-vl only"):
        envs.make("gp-l", split="ood-visual")
    with pytest.raises(EnvError, match="unknown option 'verify_iters'.*did you mean 'verify_iter'"):
        envs.make("gp-l", verify_iters=3)
    with pytest.raises(EnvError, match="'verify_iter' must be an integer >= 1"):
        envs.make("gp-l", verify_iter=0)
    with pytest.raises(EnvError, match="'target'"):
        envs.make("gp-l", target="24")
    with pytest.raises(EnvError, match="unknown color 'green'"):
        envs.make("gp-vl", color="green")
    with pytest.raises(EnvError, match="language_only"):
        envs.make("gp-vl", language_only=True)
    with pytest.raises(EnvError, match="'exact' must be true or false"):
        envs.make("gp-l", exact="yes")
    for bad in (0.5, "-1", True):
        with pytest.raises(EnvError, match="'repeat_penalty' must be a number in \\[-100, 0\\]"):
            envs.make("gp-l", repeat_penalty=bad)


def test_custom_template_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("Make {target_number}. Rule: {face_card_msg} Cards: {cards} {{json}}\n", encoding="utf-8")
    env = envs.make("gp-l", template=str(path))
    obs, _ = env.reset(options={"cards": ["A", "3", "K", "10"]})
    assert obs["text"] == "Make 24. Rule: 'J', 'Q', and 'K' count as '10'. Cards: ['A', '3', 'K', '10'] {json}\n"
    custom = envs.make("gp-l", template=path, face_card_msg="faces are 10.")
    assert "Rule: faces are 10." in custom.reset(seed=0)[0]["text"]


@pytest.mark.parametrize(
    "variant, text, match",
    [
        ("gp-l", "{target_number} {face_card_msg} {cards} {card}", r"unknown field \{card\}"),
        ("gp-l", "{target_number} {face_card_msg}", r"missing required field \{cards\}"),
        ("gp-vl", "{target_number} {face_card_msg} {cards}", r"unknown field \{cards\}.*image"),
        ("gp-l", "{target_number} {face_card_msg} {cards} {", "doubled"),
        ("gp-l", "{target_number} {face_card_msg} {cards.__class__}", r"\{cards.__class__\} is not allowed"),
        ("gp-l", "{target_number!r} {face_card_msg} {cards}", r"\{target_number!r\} is not allowed"),
        ("gp-l", "{0} {target_number} {face_card_msg} {cards}", r"\{0\} is not allowed"),
    ],
)
def test_bad_template_files(tmp_path, variant, text, match):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(EnvError, match=match) as e:
        envs.make(variant, template=path)
    assert str(path) in str(e.value)


def test_missing_template_file(tmp_path):
    with pytest.raises(EnvError, match=r"template file .*nope.txt does not exist"):
        envs.make("gp-l", template=tmp_path / "nope.txt")


def test_shipped_templates_are_valid_and_own_wording():
    for variant in ("gp-l", "gp-vl"):
        template = prompts.load_template(None, variant=variant)
        assert "[Task Description]" in template.text and "[Output]" in template.text
        assert '"formula"' in template.text and '"cards"' in template.text and '"number"' in template.text
    assert prompts.feedback("x.") == "You failed this trial because x."


def test_expert_answers_score_5_exact_and_float():
    rng = np.random.default_rng(0)
    for face10, ood in ((True, False), (False, True)):
        env = envs.make("gp-l", face_cards_as_10=face10, ood=ood)
        env.reset(seed=int(face10))
        for _ in range(150):
            _, info = env.reset()
            text = expert.expert_answer(info["cards"], info["numbers"], rng=rng)
            assert text.startswith('{\n  "cards": [') and text.endswith('",\n}')
            puzzle = verifier.Puzzle(info["numbers"], info["cards"])
            for exact in (True, False):
                assert verifier.score(text, puzzle, exact=exact, language_only=False).reward == 5, text
    assert expert.expert_answer(["3", "3", "8", "8"], [3, 3, 8, 8]).endswith('"formula": "8/(3-8/3)=24",\n}')
    assert expert.format_answer(["A", "3", "K", "10"], [1, 3, 10, 10], "(10*10-4)/4") == (
        "{\n  \"cards\": ['A', '3', 'K', '10'],\n  \"number\": [1, 3, 10, 10],\n  \"formula\": \"(10*10-4)/4=24\",\n}"
    )


def test_dealt_order_expert_answers_score_5_and_keep_the_order_when_they_can():
    rng = np.random.default_rng(0)
    env = envs.make("gp-l", split="train")
    in_order = 0
    for i in range(200):
        _, info = env.reset(seed=i)
        text = expert.expert_answer(info["cards"], info["numbers"], rng=rng, dealt_order=True)
        puzzle = verifier.Puzzle(info["numbers"], info["cards"])
        for exact in (True, False):
            assert verifier.score(text, puzzle, exact=exact, language_only=False).reward == 5, text
        formula = text.split('"formula": "')[1].split("=")[0]
        ordered = [
            s
            for s in solver.solutions(tuple(sorted(info["numbers"])), 24)
            if expert.numbers_in(s) == list(info["numbers"]) and expert.float_exact(s, 24)
        ]
        assert (expert.numbers_in(formula) == list(info["numbers"])) == bool(ordered), (text, ordered)
        in_order += bool(ordered)
    assert 100 <= in_order <= 140  # about 60% of training hands have a solution in dealt order
    assert expert.choose_solution([4, 7, 10, 10], dealt_order=True) == "4*(7-10/10)"
    assert expert.numbers_in("(10*10-4)/4") == [10, 10, 4, 4]


def test_metrics():
    episodes = [[-3, -2, 5], [-1, -1, -1, -1, -1, -1], [5]]
    assert metrics.success_rate(episodes) == pytest.approx(2 / 3)
    assert metrics.recognition_accuracy([-1.5, 5, -3, -1.5]) == 0.5
    assert math.isnan(metrics.recognition_accuracy([])) and math.isnan(metrics.success_rate([]))
    counts = metrics.outcome_counts([5, 1, -1, -1.5, -2, -3, -4, 0, "STEP_LIMIT"])
    assert counts == {
        "CORRECT": 1, "PARTIAL": 1, "NO_SOLUTION": 1, "INCORRECT_VISION": 1, "INCORRECT_NUMBER": 1,
        "ILLEGAL_FORMULA": 1, "AGGREGATED_ERROR": 2, "STEP_LIMIT": 1,
    }  # fmt: skip
    assert metrics.binomial_stderr(0.5, 100) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="unknown outcome"):
        metrics.outcome_counts(["WIN"])


def test_episode_stats_over_env_episodes():
    env = envs.make("gp-vl")
    stats = metrics.EpisodeStats()
    for seed in range(3):
        _, info = env.reset(seed=seed)
        wrong = ["A", "A", "A", "A"]
        for text in (answer(info, "1", cards=wrong), answer(info, info["solutions"][0]) if seed else "x"):
            _, r, term, trunc, info = env.step(text)
            stats.add(r, info["outcome"], done=term or trunc or text == "x")
    summary = stats.summary()
    assert summary["episodes"] == 3 and summary["turns"] == 6
    assert summary["success_rate"] == pytest.approx(2 / 3)
    assert summary["recognition_accuracy"] == pytest.approx(1 - 4 / 6)  # "x" has no cards either
    assert summary["turns/INCORRECT_VISION"] == 4 and summary["turns/CORRECT"] == 2

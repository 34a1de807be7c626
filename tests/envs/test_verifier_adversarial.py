"""Adversarial answers to both verifiers (issue 23): worst-case scoring time of answers up to 1 MB,
bounded feedback text, the GP reward floor option, and a time-bounded fuzz over long hostile text.

Model output is untrusted input: scoring any answer up to 1 MB must take under 0.5 s, and the
feedback turn built from it must stay short enough for the next prompt of a multi-turn episode."""

from __future__ import annotations

import builtins
import contextlib
import random
import re
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftrl_jax import envs
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.general_points import answer as answer_lib
from sftrl_jax.envs.general_points import grammar
from sftrl_jax.envs.general_points import prompts as gp_prompts
from sftrl_jax.envs.general_points import verifier as gp
from sftrl_jax.envs.virl import verifier as virl
from tests.envs.virl_fixtures import hand_route

MB = 1 << 20
BUDGET_S = 0.5  # worst-case seconds to score one answer of up to 1 MB
P1136 = gp.Puzzle((1, 1, 3, 6), ("A", "A", "3", "6"))


def _fill(unit: str, size: int = MB) -> str:
    return unit * (size // len(unit))


def _formula(body: str) -> str:
    return '"formula": "' + body[: MB - 16] + '"'


# Each one hit a slow path or an unbounded message before the fixes of issue 23 (or is its neighbour).
GP_WORST = {
    "cards_open": _fill('"cards": ['),  # the cards regex rescanned to the end from every start: quadratic
    "number_open": _fill('"number": ['),
    "cards_empty": _fill('"cards": []'),
    "cards_then_bracket": _fill('"cards": [') + "]",
    "formula_open": _fill('"formula": "'),
    "operators": _fill("+-*/"),  # one -3 and one message per grammar violation
    "json_operators": '{"formula": "' + _fill("+-*/", MB - 20) + '"}',
    "regex_operators": _formula(_fill("+-*/")),
    "parens": _formula(_fill(")(")),
    "open_parens": _formula(_fill("(", MB - 30) + "6*(3+1)*1"),
    "long_numbers": _formula(_fill("9" * 4300 + "+")),
    "longer_numbers": _formula(_fill("9" * 5000 + "*")),
    "distinct_numbers": _formula("+".join(str(i) for i in range(150_000))),
    "digits": _formula(_fill("1")),
    "ones": _formula(_fill("1+")),
    "braces": _fill("{"),
    "nested_json": _fill('{"formula":'),
    "brackets": _fill("["),
    "quotes": _fill('"'),
    "unicode_digits": _formula(_fill("\u0663+")),
}

VIRL_WORST = {
    "action_open": _fill('"action": "'),
    "action_escapes": '"action": "' + _fill("\\", MB - 12),
    "action_spaces": '"action"' + _fill(" ", MB - 8),
    "action_keys": _fill('"action" '),
    "observation_open": _fill('"current observation": "'),
    "braces": _fill("{"),
    "brace_strings": _fill('{"'),
    "objects": _fill('{"a": 1} '),
    "nested": _fill('{"action": ['),
    "long_action": '{"action": "' + _fill("x", MB - 20) + '"}',
    "long_observation": '{"current observation": "' + _fill("intersection ", MB - 40) + '"}',
}


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fails a call that runs past `seconds` (a regression would otherwise hang the suite for minutes)."""

    def fail(signum, frame):
        raise AssertionError(f"still scoring after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _best_time(fn, repeats: int = 2) -> float:
    """Best of `repeats` wall times: other processes share the 2 cores, the bound is on our work."""
    best = float("inf")
    for _ in range(repeats):
        gp.clear_cache()
        with _deadline(10 * BUDGET_S):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


@pytest.fixture(scope="module", params=["gp-l", "gp-vl"])
def gp_env(request):
    return envs.make(request.param)


@pytest.mark.parametrize("name", list(GP_WORST))
def test_gp_worst_case_scoring_time_and_feedback_size(gp_env, name):
    """env.step (which reads the cards also for GP-L) on 1 MB of hostile text: < 0.5 s, short feedback."""
    text = GP_WORST[name]
    assert len(text) <= MB

    def step():
        gp_env.reset(seed=0)
        return gp_env.step(text)

    seconds = _best_time(step)
    obs, reward, terminated, truncated, info = step()
    assert seconds < BUDGET_S, f"{name}: {seconds:.3f} s"
    assert not terminated and reward <= 0
    assert len(obs["text"]) <= len(gp_prompts.FEEDBACK_PREFIX) + gp.MAX_MESSAGE_CHARS, (name, len(obs["text"]))
    assert len(info["reward_breakdown"]) <= gp.MAX_LISTED_PENALTIES + 1
    assert sum(r for r, _ in info["reward_breakdown"]) == reward


@pytest.mark.parametrize("name", list(VIRL_WORST))
def test_virl_worst_case_scoring_time_and_feedback_size(name):
    text = VIRL_WORST[name]
    assert len(text) <= MB

    def verify():
        return virl.verify(text, gt_action="forward()", gt_landmark_obs="x", gt_observation="x")

    seconds = _best_time(verify)
    verdict = verify()
    assert seconds < BUDGET_S, f"{name}: {seconds:.3f} s"
    assert verdict.reward in (virl.INCORRECT_ACTION, virl.INCORRECT_OBSERVATION)
    assert len(verdict.message) <= 400


def test_virl_env_step_on_a_megabyte():
    env = envs.make("virl-l", split="train", routes=[hand_route()], drop_rate=0.0)
    env.reset(options={"route_idx": 0})
    t0 = time.perf_counter()
    obs, reward, *_ = env.step(VIRL_WORST["action_open"])
    assert time.perf_counter() - t0 < BUDGET_S
    assert reward == virl.INCORRECT_ACTION and len(obs["text"]) < 400


_REFERENCE_FIELD = {k: re.compile(rf'"{k}": \[([^\]]+)\]') for k in ("cards", "number")}


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.sampled_from(['"cards": [', '"number": [', "]", "[", "A", ", ", "\n", '"', "3"]), max_size=12))
def test_list_fields_read_as_the_reference_regex_does(parts):
    """The linear reader returns the first match of the reference's `"cards": \\[([^\\]]+)\\]`."""
    text = "".join(parts)
    for key, pattern in _REFERENCE_FIELD.items():
        match = pattern.search(text)
        assert answer_lib.list_field(text, key) == (None if match is None else match.group(1)), (key, text)


def test_cards_and_numbers_examples():
    text = '"cards": [] x "cards": ["A", 3, 6,1] "cards": [K, K, K, K]'
    assert gp.parse_answer(text).cards == ["A", "3", "6", "1"]
    assert gp.parse_answer('"cards": []"cards": [A,A,3,6]').cards == ["A", "A", "3", "6"]
    assert gp.parse_answer('"cards": [A, A, 3, 6').cards == []  # no closing bracket anywhere
    assert gp.parse_answer('"cards": [[A, A, 3, 6]').cards == ["A", "A", "3", "6"]
    assert gp.parse_answer('"number": [1, 1, 3, 6] "number": [2, 2, 2, 2]').numbers == ["1", "1", "3", "6"]
    assert gp.parse_answer('"number": []').numbers == []
    assert gp.parse_answer('"cards": [A,A,3,6]', reference_card_parsing=True).cards == ["A", "A", "3", "6"]
    assert gp.parse_answer('"cards": [1, 1, 3, 6]', reference_card_parsing=True).cards == []


# --------------------------------------------------------------------------------------- item 2: feedback


def test_penalties_keep_the_papers_reward_but_the_feedback_is_bounded():
    """1 MB of '+-*/': the paper's reward (-3 per violation, here 2**20 of them), a short message."""
    verdict = gp.score(_fill("+-*/"), P1136)  # not JSON, no "formula": the formula is "None"
    assert verdict.reward == -3.0
    verdict = gp.score('{"formula": "' + _fill("+-*/") + '"}', P1136)
    n = MB  # every operator is a violation: the first follows nothing, the others follow an operator
    assert verdict.reward == -3.0 * n - 2.0  # and no card number is used: -2
    assert verdict.outcome == "AGGREGATED_ERROR"
    assert len(verdict.message) <= gp.MAX_MESSAGE_CHARS
    listed = ", ".join(["invalid sequence after operator"] * gp.MAX_LISTED_PENALTIES)
    assert verdict.message == f"{listed}, and {n + 1 - gp.MAX_LISTED_PENALTIES} more errors."
    assert len(verdict.penalties) == gp.MAX_LISTED_PENALTIES + 1
    rest = n + 1 - gp.MAX_LISTED_PENALTIES
    assert verdict.penalties[-1] == (-3.0 * (n - gp.MAX_LISTED_PENALTIES) - 2.0, f"and {rest} more errors")
    assert sum(r for r, _ in verdict.penalties) == verdict.reward


def test_short_penalty_lists_keep_the_reference_messages():
    verdict = gp.score('"formula": "6**3++1-1"', P1136)
    assert (verdict.reward, verdict.message) == (
        -6,
        "invalid sequence after operator, invalid sequence after operator.",
    )
    n = gp.MAX_LISTED_PENALTIES
    verdict = gp.score('"formula": "6*' + "*" * n + '3*1*1"', P1136)  # n violations: all listed
    assert verdict.message == ", ".join(["invalid sequence after operator"] * n) + "."
    verdict = gp.score('"formula": "6*' + "*" * (n + 1) + '3*1*1"', P1136)
    assert verdict.message == ", ".join(["invalid sequence after operator"] * n) + ", and 1 more error."
    assert verdict.reward == -3.0 * (n + 1) and verdict.penalties[-1] == (-3.0, "and 1 more error")


def test_number_lists_in_messages_are_bounded():
    formula = "+".join(["9" * 5000] + [str(i) for i in range(20, 60)])
    verdict = gp.score(f'"formula": "{formula}"', P1136)
    assert verdict.reward == -4.0
    assert verdict.message == (
        "you used invalid numbers: [999999999999..., 20, 21, 22, 23, 24, 25, 26, ...], "
        "you didn't use numbers: [1, 3, 6]."
    )
    verdict = gp.score('"formula": "6*4*1*1"', P1136)  # short lists: the reference's text
    assert verdict.message == "you used invalid numbers: [4], you didn't use numbers: [3]."


def test_a_long_answer_gives_a_short_feedback_turn():
    """The issue's case: a 262-token answer gave a 3,102-token feedback turn."""
    env = envs.make("gp-l")
    env.reset(seed=0)
    text = '{"cards": ["A"], "number": [1], "formula": "' + "*/" * 400 + '=24"}'
    obs, reward, *_ = env.step(text)
    assert reward == -3.0 * 800 - 2.0  # the paper's reward: 800 violations, the card numbers unused
    assert len(obs["text"]) <= len(gp_prompts.FEEDBACK_PREFIX) + gp.MAX_MESSAGE_CHARS
    assert len(obs["text"]) < 400


# ------------------------------------------------------------------------------------------ reward floor


def test_reward_floor_is_off_by_default_and_bounds_totals():
    text = '{"formula": "' + "*/" * 50 + '"}'
    env = envs.make("gp-l")
    assert env.reward_floor is None
    env.reset(seed=0)
    _, paper, *_ = env.step(text)
    assert paper == -3.0 * 100 - 2.0  # 100 violations, no card number used

    floored = envs.make("gp-l", reward_floor=-10)
    floored.reset(seed=0)
    _, reward, _, _, info = floored.step(text)
    assert reward == -10.0
    assert sum(r for r, _ in info["reward_breakdown"]) == -10.0
    assert info["reward_breakdown"][-1] == (-10.0 - paper, gp.FLOOR_MESSAGE)
    assert info["outcome"] == "AGGREGATED_ERROR"  # what the answer did, not the floored number
    # single entries of the paper's table are never changed by a floor (it must be <= -3)
    floored.reset(seed=0)
    _, reward, _, _, info = floored.step('"formula": "x"')
    assert reward == -3.0 and info["reward_breakdown"] == [(-3.0, "illegal characters")]


def test_reward_floor_same_in_verifier_and_env():
    text = '"formula": "' + "**" * 20 + '"'
    assert gp.score(text, P1136, reward_floor=-5.0).reward == -5.0
    assert gp.score(text, P1136).reward == -3.0 * 40 - 2.0
    assert gp.score('"formula": "6*(3+1)*1"', P1136, reward_floor=-5.0).reward == 5.0


@pytest.mark.parametrize("bad", [-2.0, 0, float("nan"), float("-inf"), "low", True])
def test_reward_floor_is_validated(bad):
    with pytest.raises(EnvError, match="option 'reward_floor' must be"):
        envs.make("gp-l", reward_floor=bad)


# ------------------------------------------------------------------------------------------------ fuzz

_HOSTILE_UNITS = [
    '"cards": [',
    '"number": [',
    '"formula": "',
    '"action": "',
    '"current observation": "',
    "+-*/",
    "(",
    ")",
    "{",
    "[",
    '"',
    "\\",
    "9" * 50,
    "intersection ",
    "]",
    "}",
    ", ",
]
# long repetitions of the hostile units of items 1 and 2, mixed with arbitrary text
_hostile = st.lists(
    st.tuples(st.sampled_from(_HOSTILE_UNITS) | st.text(max_size=8), st.integers(1, 20_000)),
    min_size=1,
    max_size=4,
).map(lambda parts: "".join(unit * n for unit, n in parts)[:MB])


def _no_code(*args, **kwargs):
    raise AssertionError("a verifier must never run code")


_CHECKED: list[float] = []


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(text=_hostile, language_only=st.booleans())
def _fuzz(text, language_only):
    saved = builtins.eval, builtins.exec
    builtins.eval = builtins.exec = _no_code
    try:
        t0 = time.perf_counter()
        g = gp.score(text, P1136, language_only=language_only)
        _ = g.answer.cards, g.answer.numbers
        v = virl.verify(text, gt_action="forward()", gt_landmark_obs="x", gt_observation="x")
        seconds = time.perf_counter() - t0
    finally:
        builtins.eval, builtins.exec = saved
    _CHECKED.append(seconds)
    assert seconds < 2 * BUDGET_S, (seconds, text[:80])  # both verifiers together
    assert g.reward in (5, 1) or g.reward <= 0
    assert len(g.message) <= gp.MAX_MESSAGE_CHARS and len(g.penalties) <= gp.MAX_LISTED_PENALTIES + 1
    assert sum(r for r, _ in g.penalties) == g.reward
    assert v.reward in (virl.CORRECT, virl.INCORRECT_ACTION, virl.INCORRECT_OBSERVATION)
    assert len(v.message) <= 400


def test_fuzz_long_hostile_answers_both_verifiers():
    """40 long hostile answers (up to 1 MB) through both verifiers: bounded time and feedback."""
    _CHECKED.clear()
    _fuzz()
    assert len(_CHECKED) >= 40


def test_vectorised_grammar_equals_the_token_loop():
    """grammar.violations (formulas over 2,048 characters) gives the token loop's penalties, in order."""
    rng = random.Random(3)
    for _ in range(3000):
        formula = "".join(
            rng.choice(["1", "23", "\u0663", "+", "-", "*", "/", "(", ")"]) for _ in range(rng.randrange(30))
        )
        loop = gp._grammar_penalties(formula, fast=False)
        assert [grammar.MESSAGES[r] for r in grammar.violations(formula)] == [m for _, m in loop], formula
    long = "(" * 3000 + "1+1)" + ")" * 10 + "**" * 2000 + "3(6"
    loop = gp._grammar_penalties(long)
    assert len(loop) == 4000  # 3,999 operators after an operator, one '(' after a number
    assert gp._grammar_head(long) == (loop[: gp.MAX_LISTED_PENALTIES], 4000)

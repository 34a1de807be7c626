"""Verifier: every reward case of SPEC §1.6, parsing quirks, exact vs float, parity with an
independent implementation of the reference, and a fuzz test over arbitrary text."""

from __future__ import annotations

import builtins
import json
import random
import re
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftrl_jax.envs.general_points import arithmetic, solver, verifier
from tests.envs import gp_reference as ref

P1136 = verifier.Puzzle((1, 1, 3, 6), ("A", "A", "3", "6"))
P3388 = verifier.Puzzle((3, 3, 8, 8), ("3", "3", "8", "8"))


def sft_answer(formula: str, cards=("A", "A", "3", "6"), numbers=(1, 1, 3, 6), target=24) -> str:
    return f'{{\n  "cards": {list(cards)!r},\n  "number": {list(numbers)!r},\n  "formula": "{formula}={target}",\n}}'


@pytest.mark.parametrize(
    "formula, reward, message",
    [
        # the verified examples of SPEC §1.6
        ("6*(3+1)*1", 5, "Correct solution."),
        ("6 * (3 + 1) * 1", -3, "illegal characters."),
        ("6*3+1+1", -1, "6* is partially correct but the full formula does not match any solution."),
        ("6*(3+1)", -2, "you didn't use numbers: [1]."),
        ("6*4*1*1", -4, "you used invalid numbers: [4], you didn't use numbers: [3]."),
        ("6**3+1-1", -3, "invalid sequence after operator."),
        # other cases of the table
        ("6*(3+1*1", 1, "partial solution."),  # unclosed '(' and a prefix of the solution 6*(3+1*1)
        ("(6*(3+1)*1", -1, "(6* is partially correct but the full formula does not match any solution."),
        ("3+6+1+1", -1, "3 is partially correct but the full formula does not match any solution."),
        ("6*6*1*1", -4, "you used numbers: [6] too many times, you didn't use numbers: [3]."),
        ("6*3*1*1*1", -2, "you used numbers: [1] too many times."),
        ("6**3++1-1", -6, "invalid sequence after operator, invalid sequence after operator."),
        ("6**(3+1)", -5, "invalid sequence after operator, you didn't use numbers: [1]."),
        ("6*(3+1)*1)", -3, "unmatched closing parenthesis."),
        ("6(3+1)*1", -6, "invalid sequence before '(', unmatched closing parenthesis."),
        ("6*(3+1)1", -3, "invalid sequence after number."),
        ("6*()3+1*1", -6, "invalid sequence after ')', invalid sequence after number."),
        ("6 3", -3, "illegal characters."),
        ("x", -3, "illegal characters."),
        ("", -2, "you didn't use numbers: [1, 3, 6]."),
        ("6/(1-1)*3", -1, "6/ is partially correct but the full formula does not match any solution."),  # 1/0
        ("06*(3+1)*1", -1, "your formula does not match any solution."),  # eval rejects leading zeros
        ("((6))*(3+1)*1", 5, "Correct solution."),
        ("6*(3+1)*1*", -1, "6*(3+1)*1 is partially correct but the full formula does not match any solution."),
    ],
)
def test_reward_table(formula, reward, message):
    verdict = verifier.score(sft_answer(formula), P1136)
    assert (verdict.reward, verdict.message) == (reward, message)
    assert verdict.reward == sum(r for r, _ in verdict.penalties)
    assert verdict.answer.formula == formula


def test_missing_formula_is_none_and_illegal():
    for text in ("None", "the answer is 6*(3+1)*1", '{"cards": ["A"]}', '"formula":"6*(3+1)*1=24"', ""):
        verdict = verifier.score(text, P1136)
        assert verdict.answer.formula in ("None",), text
        assert (verdict.reward, verdict.message, verdict.outcome) == (-3, "illegal characters.", "ILLEGAL_FORMULA")


def test_outcomes_by_reward():
    assert verifier.score(sft_answer("6*(3+1)*1"), P1136).outcome == "CORRECT"
    assert verifier.score(sft_answer("6*(3+1*1"), P1136).outcome == "PARTIAL"
    assert verifier.score(sft_answer("6*3+1+1"), P1136).outcome == "NO_SOLUTION"
    assert verifier.score(sft_answer("6*(3+1)"), P1136).outcome == "INCORRECT_NUMBER"
    assert verifier.score(sft_answer("6*4*1*1"), P1136).outcome == "AGGREGATED_ERROR"
    assert verifier.outcome_of(-1.5) == "INCORRECT_VISION"


def test_formula_cut_at_first_equals_and_json_path():
    text = json.dumps({"cards": ["A", "A", "3", "6"], "number": [1, 1, 3, 6], "formula": "6*(3+1)*1=24=25"})
    verdict = verifier.score(text, P1136)
    assert verdict.answer.formula == "6*(3+1)*1" and verdict.reward == 5
    # valid JSON whose formula is not a string: the reference crashes, we score it as illegal
    for value in (24, None, [1], {"a": 1}):
        verdict = verifier.score(json.dumps({"formula": value}), P1136)
        assert (verdict.reward, verdict.message) == (-3, "illegal characters.")
    # a JSON object without "formula" falls back to the regex on the whole text
    assert verifier.score('{"x": "\\"formula\\": \\"6*(3+1)*1\\""}', P1136).reward == -3


def test_exact_vs_reference_float():
    text = sft_answer("8/(3-8/3)", cards=("3", "3", "8", "8"), numbers=(3, 3, 8, 8))
    exact = verifier.score(text, P3388)
    assert (exact.reward, exact.message) == (5, "Correct solution.")
    floaty = verifier.score(text, P3388, exact=False)
    assert (floaty.reward, floaty.message, floaty.outcome) == (0, ".", "AGGREGATED_ERROR")
    assert verifier.evaluate("8/(3-8/3)") == 24
    assert verifier.evaluate("8/(3-8/3)", exact=False) == 8 / (3 - 8 / 3) != 24


def test_vision_check_first_and_card_parsing():
    vl = dict(language_only=False)
    right = sft_answer("6*(3+1)*1", cards=("6", "A", "3", "A"))
    assert verifier.score(right, P1136, **vl).reward == 5  # order does not matter
    wrong = sft_answer("6*(3+1)*1", cards=("6", "A", "3", "2"))
    verdict = verifier.score(wrong, P1136, **vl)
    assert (verdict.reward, verdict.message, verdict.outcome) == (
        -1.5,
        "you recognized wrong cards",
        "INCORRECT_VISION",
    )
    # the card check comes before the formula checks
    assert verifier.score(sft_answer("6 * 4", cards=("6", "A", "3", "2")), P1136, **vl).reward == -1.5
    assert verifier.score(sft_answer("6 * 4", cards=("6", "A", "3", "A")), P1136, **vl).reward == -3
    # three cards, or no cards field: no cards recognised
    assert verifier.score(sft_answer("6*(3+1)*1", cards=("6", "A", "3")), P1136, **vl).reward == -1.5
    assert verifier.score('"formula": "6*(3+1)*1=24"', P1136, **vl).reward == -1.5
    # the language-only variant ignores the cards
    assert verifier.score(wrong, P1136).reward == 5


def test_card_quirks_of_the_reference_behind_a_flag():
    p = verifier.Puzzle((4, 3, 2, 7), ("4", "3", "2", "7"))
    unquoted = '{\n  "cards": [4, 3, 2, 7],\n  "number": [4, 3, 2, 7],\n  "formula": "4*(7-3+2)=24",\n}'
    as_json = json.dumps({"cards": ["4", "3", "2", "7"], "formula": "4*(7-3+2)=24"})
    double_quoted = '{"cards": ["4", "3", "2", "7"], "formula": "4*(7-3+2)=24",}'
    for text in (unquoted, as_json, double_quoted):
        assert verifier.parse_answer(text).cards == ["4", "3", "2", "7"]
        assert verifier.score(text, p, language_only=False).reward == 5
        assert verifier.parse_answer(text, reference_card_parsing=True).cards != ["4", "3", "2", "7"]
        assert verifier.score(text, p, language_only=False, reference_card_parsing=True).reward == -1.5


def test_score_many_and_non_string_input():
    texts = [sft_answer("6*(3+1)*1"), sft_answer("6*(3+1)"), None, 12, b'"formula": "6*(3+1)*1"']
    rewards = [v.reward for v in verifier.score_many(texts, P1136)]
    assert rewards == [5, -2, -3, -3, 5]
    per_text = verifier.score_many([sft_answer("6*(3+1)*1"), sft_answer("8/(3-8/3)")], [P1136, P3388])
    assert [v.reward for v in per_text] == [5, 5]
    with pytest.raises(ValueError, match="2 texts but 1 puzzles"):
        verifier.score_many(["a", "b"], [P1136])


def test_evaluate():
    assert verifier.evaluate("(10*10-4)/4") == 24
    assert verifier.evaluate("1/3") == Fraction(1, 3)
    assert verifier.evaluate("2*(3+4") is None  # unclosed
    assert verifier.evaluate("1/(2-2)") is None  # division by zero
    assert verifier.evaluate("007") is None and verifier.evaluate("00") == 0  # Python's literal rules
    assert verifier.evaluate("(" * 200 + "1" + ")" * 200) == 1
    assert verifier.evaluate("(" * 201 + "1" + ")" * 201) is None  # CPython: too many nested parentheses
    assert verifier.evaluate("\u0663*8") is None  # non-ASCII digits: eval rejects them
    assert verifier.evaluate("__import__('os')") is None


def _random_formula(rng: random.Random, values) -> str:
    """Formula-like strings near the interesting cases: card numbers in random order, operators,
    parentheses (sometimes unbalanced), sometimes a wrong or extra number, a leading zero or junk."""
    nums = [str(v) for v in values]
    rng.shuffle(nums)
    if rng.random() < 0.2:
        nums[rng.randrange(4)] = str(rng.randrange(0, 15))
    if rng.random() < 0.1:
        nums.append(str(rng.choice(values)))
    if rng.random() < 0.05:
        nums[0] = "0" + nums[0]
    parts = []
    for i, n in enumerate(nums):
        parts.append("(" * rng.choice((0, 0, 0, 1, 2)) + n + ")" * rng.choice((0, 0, 0, 1)))
        if i < len(nums) - 1:
            parts.append(rng.choice("+-*/") * (2 if rng.random() < 0.03 else 1))
    text = "".join(parts)
    if rng.random() < 0.1:
        pos = rng.randrange(len(text) + 1)
        text = text[:pos] + rng.choice(["(", ")", " ", "x", "**", "="]) + text[pos:]
    return text


def _random_values(rng: random.Random):
    while True:
        values = tuple(rng.randint(1, 13) for _ in range(4))
        if solver.is_solvable(values):
            return values


def test_parity_with_reference_implementation():
    """exact=False + reference_card_parsing=True reproduce the reference's reward and message."""
    rng = random.Random(0)
    sym = {1: "A", 11: "J", 12: "Q", 13: "K"}
    compared = 0
    for _ in range(2000):
        values = _random_values(rng)
        symbols = tuple(sym.get(v, str(v)) for v in values)
        puzzle = verifier.Puzzle(values, symbols)
        sols = list(puzzle.solutions)
        if rng.random() < 0.3:  # sometimes type a solution, or a prefix of one
            sol = rng.choice(sols)
            formula = sol if rng.random() < 0.6 else sol[: rng.randrange(len(sol))]
        else:
            formula = _random_formula(rng, values)
        cards = list(symbols) if rng.random() < 0.7 else list(symbols[:3]) + ["Q"]
        style = rng.randrange(3)
        if style == 0:
            text = sft_answer(formula, cards=cards, numbers=values)
        elif style == 1:
            text = json.dumps({"cards": cards, "number": list(values), "formula": formula + "=24"})
        else:
            text = f'"cards": [{", ".join(cards)}], "formula": "{formula}"'
        language_only = rng.random() < 0.5
        want = ref.reference_score(text, list(values), list(symbols), sols, language_only=language_only)
        got = verifier.score(text, puzzle, language_only=language_only, exact=False, reference_card_parsing=True)
        assert (got.reward, got.message) == want, (text, values)
        compared += 1
    assert compared == 2000


def test_evaluator_matches_python_semantics():
    rng = random.Random(1)
    for _ in range(3000):
        formula = _random_formula(rng, _random_values(rng))
        if not arithmetic.LEGAL.fullmatch(formula) or re.search(r"[+\-*/]{2}", formula):
            continue  # Python also has unary signs, ** and //; the verifier's grammar pass rejects those first
        try:
            want_float = ref.ast_value(formula)
            want_exact = ref.ast_value(formula, exact=True)
        except Exception:
            want_float = want_exact = None
        assert verifier.evaluate(formula, exact=False) == want_float, formula
        assert verifier.evaluate(formula) == want_exact, formula


def test_grammar_fast_path_matches_token_loop():
    rng = random.Random(2)
    alphabet = "12+*()"
    for _ in range(5000):
        formula = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        assert verifier._grammar_penalties(formula) == verifier._grammar_penalties(formula, fast=False), formula


_FORMULA_CHARS = "0123456789+-*/() =x.\u0663"
_answers = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=_FORMULA_CHARS, max_size=40).map(lambda f: sft_answer(f)),
    st.text(alphabet=_FORMULA_CHARS, max_size=40).map(
        lambda f: json.dumps({"formula": f, "cards": ["A", "A", "3", "6"]})
    ),
    st.text(alphabet=_FORMULA_CHARS, max_size=40).map(lambda f: f'"cards": [A, 1, 3, 6], "formula": "{f}"'),
    st.lists(st.sampled_from(["1", "3", "6", "+", "-", "*", "/", "(", ")"]), max_size=25).map(
        lambda t: sft_answer("".join(t))
    ),
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.sampled_from(["formula", "cards", "number"]), c),
        max_leaves=8,
    ).map(json.dumps),
)


def _no_code(*args, **kwargs):
    raise AssertionError("the verifier must never run code")


# 2,000 examples of 5 answers each = 10,000 strings: hypothesis costs ~2 ms per example but far less
# per extra list element, so batching keeps the test to a few seconds.
@settings(max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(texts=st.lists(_answers, min_size=5, max_size=5), language_only=st.booleans(), exact=st.booleans())
def _fuzz(texts, language_only, exact):
    # eval/exec are swapped out only around the verifier call: hypothesis itself uses exec.
    saved = builtins.eval, builtins.exec
    builtins.eval = builtins.exec = _no_code
    try:
        verdicts = verifier.score_many(texts, P1136, language_only=language_only, exact=exact)
    finally:
        builtins.eval, builtins.exec = saved
    _FUZZED.append(len(texts))
    for verdict in verdicts:
        assert isinstance(verdict.message, str) and verdict.message
        assert verdict.reward in (5, 1) or verdict.reward <= 0
        if verdict.reward == 5:
            assert verifier.evaluate(verdict.answer.formula, exact=exact) == 24
        if verdict.reward == 1:
            assert verifier.evaluate(verdict.answer.formula) is None
            assert any(s.startswith(verdict.answer.formula) for s in P1136.solutions)


_FUZZED: list[int] = []


def test_fuzz_never_raises_never_runs_code():
    """10,000 arbitrary and formula-like answers: no exception, no code run, reward <= 0 unless right."""
    _FUZZED.clear()
    _fuzz()
    assert sum(_FUZZED) >= 10_000
    assert builtins.eval is not _no_code

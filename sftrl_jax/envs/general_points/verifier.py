"""GeneralPoints verifier: model text -> reward and message, the reward table of SPEC §1.6.

Pure functions over plain data; never executes model text and never raises on it. Field extraction
lives in `answer.py`, the safe evaluator in `arithmetic.py`. The stages, in the reference's order, with
its rewards and messages:

1. Parse: `json.loads` of the whole text when it is a JSON object, else (or for a missing key) the
   reference's regexes; a missing field is the string "None"; the formula is cut at its first '='.
2. GP-VL only, first: the recognised card symbols (sorted) must equal the dealt ones: -1.5
   "you recognized wrong cards" (the reference returns this message without a final period).
3. Characters: only digit runs and `+ - * / ( )` (no spaces): -3 "illegal characters", stop.
4. Grammar, one -3 per violation (they accumulate); an unclosed '(' is not a violation here.
5. Numbers: -2 for invalid or overused numbers (one penalty for either), another -2 for unused ones.
6. Only with no penalty so far, evaluate: equal to the target -> +5 "Correct solution". If evaluation
   fails (unclosed '(', division by zero, anything Python's `eval` would reject) and the formula is a
   prefix of a solution string -> +1 "partial solution". Otherwise walk the token prefixes: the first
   one that no solution string starts with -> -1; if there is none the reward stays 0 with message ".".

Messages are joined with ", " and end with ".".

The reward of a turn is the sum of its penalties, unbounded as in the paper and the reference (1 MB of
operators scores -3 x 2**20). What is bounded, for untrusted text, is the work and the text (not in the
reference, which listed every violation: 34.6 MB of feedback for 1 MB of operators):

* `penalties` lists at most `MAX_LISTED_PENALTIES` items in order; beyond that, one last item
  (sum of the rewards of the rest, "and N more errors", or "and 1 more error") stands for the rest, so the
  sum is unchanged;
* a number list in a message shows at most `MAX_LISTED_NUMBERS` numbers ("[1, 2, ...]") and a number of
  more than `MAX_NUMBER_DIGITS` digits by its first digits and "..."; up to those sizes the messages are
  the reference's, character for character;
* the message is at most `MAX_MESSAGE_CHARS` characters (a longer one is cut and ends in "...").

`reward_floor` (ours, off by default = the paper's rewards; an env option of gp-l/gp-vl): when set, a
number <= -3 and the turn's reward is below it, the reward is `reward_floor` and one more penalties item
(reward_floor - sum, "reward floor") keeps the sum equal to the reward. It only changes accumulated
totals: no single entry of the table is below -3. `outcome` and `message` stay the unfloored ones.

Deliberate differences from the reference code
(docs/GENERAL_POINTS.md): evaluation is exact over rationals (`exact=False` restores its float `==`,
under which e.g. "8/(3-8/3)" is never correct); unquoted integer card lists, JSON lists and
double-quoted symbols are read as cards (`reference_card_parsing=True` restores the reference, which
reads all three as no cards at all); a non-string JSON "formula" scores -3 (the reference crashes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

from sftrl_jax.envs.general_points import answer as answer_lib
from sftrl_jax.envs.general_points import arithmetic, grammar, solver

REWARDS = {
    "CORRECT": 5.0,
    "PARTIAL": 1.0,
    "NO_SOLUTION": -1.0,
    "INCORRECT_VISION": -1.5,
    "INCORRECT_NUMBER": -2.0,
    "ILLEGAL_FORMULA": -3.0,
}
STEP_LIMIT_REWARD = -1.0
STEP_LIMIT_MESSAGE = "step_limit_reached"
OUTCOMES = (*REWARDS, "AGGREGATED_ERROR", "STEP_LIMIT")
_OUTCOME_OF = {v: k for k, v in REWARDS.items()}

_FAST_GRAMMAR_CHARS = 512  # longer formulas take the plain linear grammar loop
_LOOP_GRAMMAR_CHARS = 2048  # longer ones the vectorised pass (grammar.py): 1 MB in ~20 ms, not ~0.3 s
MAX_LISTED_PENALTIES = 10  # items of `penalties` (and messages) listed one by one
MAX_LISTED_NUMBERS = 8  # numbers shown in a message's list
MAX_NUMBER_DIGITS = 12  # digits shown of a longer number
MAX_MESSAGE_CHARS = 512  # the verify message, and so the feedback turn, is at most this long
FLOOR_MESSAGE = "reward floor"
_CACHED_FORMULA_CHARS = 256  # only short formulas go into the per-hand result cache
# Token sequences with no grammar violation (parentheses matched separately): prefixes of
# operand (op operand)* where an operand is `(* number )*`.
_GRAMMAR_OK = re.compile(r"(?:\(*\d+\)*[+\-*/])*\(*(?:\d+\)*)?")
_OPERATORS = "+-*/"

# Public names of the parts, for callers of the verifier.
Answer = answer_lib.Answer
parse_answer = answer_lib.parse_answer
evaluate = arithmetic.evaluate
MAX_NESTING = arithmetic.MAX_NESTING


@dataclasses.dataclass(frozen=True)
class Puzzle:
    """What the verifier needs about a hand: card values (dealt order), plain symbols, target."""

    values: tuple[int, ...]
    symbols: tuple[str, ...]
    target: int = 24
    # derived once per hand: every solution-string prefix, the solution strings, sorted card texts
    prefixes: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)
    solution_set: frozenset[str] = dataclasses.field(init=False, repr=False, compare=False)
    _value_texts: list[str] = dataclasses.field(init=False, repr=False, compare=False)
    _available: dict[int, int] = dataclasses.field(init=False, repr=False, compare=False)
    _sorted_symbols: list[str] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        values = tuple(int(v) for v in self.values)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "symbols", tuple(str(s) for s in self.symbols))
        object.__setattr__(self, "target", int(self.target))
        object.__setattr__(self, "prefixes", solver.prefixes(values, self.target))
        object.__setattr__(self, "solution_set", solver.solution_set(values, self.target))
        object.__setattr__(self, "_value_texts", sorted(str(v) for v in values))
        object.__setattr__(self, "_available", dict(Counter(values)))
        object.__setattr__(self, "_sorted_symbols", sorted(self.symbols))

    @property
    def solutions(self) -> tuple[str, ...]:
        return solver.solutions(self.values, self.target)


class Verdict(NamedTuple):
    """Reward of one model turn; `penalties` lists each (reward, message) added, in order."""

    reward: float
    message: str
    outcome: str
    penalties: tuple[tuple[float, str], ...]
    answer: Answer

    @property
    def is_correct(self) -> bool:
        return self.reward == REWARDS["CORRECT"]


def outcome_of(reward: float) -> str:
    """The reference's outcome name for a turn's total reward; sums of penalties are AGGREGATED_ERROR."""
    return _OUTCOME_OF.get(float(reward), "AGGREGATED_ERROR")


# ----------------------------------------------------------------------------------------------- scoring


def _token_kind(tok: str) -> str:
    if tok in _OPERATORS:
        return "operator"
    if tok == "(":
        return "open_paren"
    if tok == ")":
        return "close_paren"
    return "number"


def _grammar_penalties(formula: str, *, fast: bool = True) -> list[tuple[float, str]]:
    """One (-3, message) per grammar violation, as the reference's token pass reports them."""
    if fast and len(formula) <= _FAST_GRAMMAR_CHARS and _GRAMMAR_OK.fullmatch(formula):
        if ")" not in formula:
            return []
        depth = 0
        for ch in formula:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth < 0:
                    break
        else:
            return []
    out = []
    penalty = REWARDS["ILLEGAL_FORMULA"]
    prev = None
    open_parens = 0
    for tok in arithmetic.TOKEN.findall(formula):
        kind = _token_kind(tok)
        after_operand = prev in ("number", "close_paren")
        if kind == "number" and after_operand:
            out.append((penalty, "invalid sequence after number"))
        elif kind == "operator" and not after_operand:
            out.append((penalty, "invalid sequence after operator"))
        elif kind == "open_paren":
            if after_operand:
                out.append((penalty, "invalid sequence before '('"))
            else:
                open_parens += 1
        elif kind == "close_paren":
            if not after_operand:
                out.append((penalty, "invalid sequence after ')'"))
            elif open_parens:
                open_parens -= 1
            else:
                out.append((penalty, "unmatched closing parenthesis"))
        prev = kind
    return out


class _LongNumber(str):
    """A digit run too long for int() (> 4300 digits): never a card; shown unquoted in messages."""

    __repr__ = str.__str__


def _int_token(tok: str) -> int | str:
    return int(tok) if len(tok) <= 4300 else _LongNumber(tok)


def _list_text(numbers: list) -> str:
    """ "[4, 10]", as the reference prints its int lists, bounded: "[4, 10, ...]", "[123456789012...]"."""
    shown = []
    for n in numbers[:MAX_LISTED_NUMBERS]:
        text = str(n)
        shown.append(text if len(text) <= MAX_NUMBER_DIGITS else text[:MAX_NUMBER_DIGITS] + "...")
    if len(numbers) > MAX_LISTED_NUMBERS:
        shown.append("...")
    return "[" + ", ".join(shown) + "]"


def _number_penalties(numbers: list[str], puzzle: Puzzle) -> list[tuple[float, str]]:
    used: dict[int | str, int] = {}
    for tok, k in Counter(numbers).items():  # distinct texts first: int() of each text once
        n = _int_token(tok)
        used[n] = used.get(n, 0) + k  # "01" and "1" are one number, counted in order of first use
    available = puzzle._available
    penalty = REWARDS["INCORRECT_NUMBER"]
    out = []
    invalid = [n for n in used if n not in available]
    if invalid:
        out.append((penalty, f"you used invalid numbers: {_list_text(invalid)}"))
    else:
        overused = [n for n, k in used.items() if k > available[n]]
        if overused:
            out.append((penalty, f"you used numbers: {_list_text(overused)} too many times"))
    unused = [n for n, k in available.items() if k > used.get(n, 0)]
    if unused:
        out.append((penalty, f"you didn't use numbers: {_list_text(unused)}"))
    return out


def _prefix_walk(formula: str, prefixes: frozenset[str]) -> tuple[tuple[float, str], ...]:
    """The reference's walk over token prefixes: the first one no solution string starts with -> -1."""
    register = ""
    for match in arithmetic.TOKEN.finditer(formula):  # stops at the first miss: never walks a long formula
        tok = match.group()
        previous, register = register, register + tok
        if register not in prefixes:
            if previous:
                message = f"{previous} is partially correct but the full formula does not match any solution"
            else:
                message = "your formula does not match any solution"
            return ((REWARDS["NO_SOLUTION"], message),)
    return ()


def _grammar_head(formula: str) -> tuple[list[tuple[float, str]], int]:
    """(the first grammar penalties, at least MAX_LISTED_PENALTIES of them if there are, their count)."""
    if len(formula) <= _LOOP_GRAMMAR_CHARS:
        penalties = _grammar_penalties(formula)
        return penalties, len(penalties)
    rules = grammar.violations(formula)
    penalty = REWARDS["ILLEGAL_FORMULA"]
    return [(penalty, grammar.MESSAGES[r]) for r in rules[:MAX_LISTED_PENALTIES].tolist()], len(rules)


def _penalties(formula: str | None, puzzle: Puzzle, exact: bool) -> tuple[tuple[float, str], ...]:
    """The reference's `step_rewards` after the card check: the (reward, message) items of one formula."""
    if formula is None:
        return ((REWARDS["ILLEGAL_FORMULA"], "illegal characters"),)
    if exact and formula in puzzle.solution_set:  # legal, grammatical, the card numbers, exactly the target
        return ((REWARDS["CORRECT"], "Correct solution"),)
    if not arithmetic.LEGAL.fullmatch(formula):
        return ((REWARDS["ILLEGAL_FORMULA"], "illegal characters"),)
    penalties, count = _grammar_head(formula)
    numbers = arithmetic.NUMBER.findall(formula)
    # exactly the card numbers, written plainly
    plain = len(numbers) == len(puzzle._value_texts) and sorted(numbers) == puzzle._value_texts
    if not plain:
        extra = _number_penalties(numbers, puzzle)
        total = REWARDS["ILLEGAL_FORMULA"] * count + sum([r for r, _ in extra])
        penalties, count = penalties + extra, count + len(extra)
    else:
        total = REWARDS["ILLEGAL_FORMULA"] * count
    if count > MAX_LISTED_PENALTIES:
        listed = penalties[:MAX_LISTED_PENALTIES]
        more = count - MAX_LISTED_PENALTIES
        rest = (total - sum([r for r, _ in listed]), f"and {more} more error{'s' if more > 1 else ''}")
        return (*listed, rest)
    if penalties:
        return tuple(penalties)
    try:
        if plain:  # ASCII digits without leading zeros: no leaf can be rejected
            leaves = [(int(t), 1) for t in numbers] if exact else [int(t) for t in numbers]
        else:
            leaves = [arithmetic.leaf(t, exact) for t in numbers]
        value = arithmetic.run(arithmetic.plan_of(formula), leaves, exact)
        if (value[0] == puzzle.target * value[1]) if exact else (value == puzzle.target):
            return ((REWARDS["CORRECT"], "Correct solution"),)
    except arithmetic.Unparsable:
        if formula in puzzle.prefixes:
            return ((REWARDS["PARTIAL"], "partial solution"),)
    return _prefix_walk(formula, puzzle.prefixes)


# (formula, values, target, exact) -> (reward, message, outcome, penalties); cleared when full.
_RESULTS: dict[tuple, tuple[float, str, str, tuple[tuple[float, str], ...]]] = {}
_RESULTS_MAX = 1 << 16


def clear_cache() -> None:
    """Forgets cached results and evaluation plans (for benchmarks; results never go stale)."""
    _RESULTS.clear()
    arithmetic.clear_plans()


def _result(penalties: tuple[tuple[float, str], ...]) -> tuple[float, str, str, tuple]:
    if len(penalties) == 1:  # the common case, without the generic joins
        reward, message = penalties[0]
        return reward, message + ".", _OUTCOME_OF.get(reward, "AGGREGATED_ERROR"), penalties
    reward = float(sum([r for r, _ in penalties]))
    message = ", ".join([m for _, m in penalties]) + "."
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return reward, message, outcome_of(reward), penalties


def check_formula(formula: str | None, puzzle: Puzzle, *, exact: bool = True) -> tuple[float, str, str, tuple]:
    """(reward, message, outcome, penalties) of an already extracted formula, without the card check.

    Results of short formulas are cached per hand: sampled answers repeat a lot."""
    if formula is None or len(formula) > _CACHED_FORMULA_CHARS:
        return _result(_penalties(formula, puzzle, exact))
    key = (formula, puzzle.values, puzzle.target, exact)
    result = _RESULTS.get(key)
    if result is None:
        result = _result(_penalties(formula, puzzle, exact))
        if len(_RESULTS) >= _RESULTS_MAX:
            _RESULTS.clear()
        _RESULTS[key] = result
    return result


_VISION = (REWARDS["INCORRECT_VISION"], "you recognized wrong cards")


def score(
    text: Any,
    puzzle: Puzzle,
    *,
    language_only: bool = True,
    exact: bool = True,
    reference_card_parsing: bool = False,
    reward_floor: float | None = None,
) -> Verdict:
    """Scores one model turn. Never raises on any text; `reward_floor` (None = the paper's rewards, else
    a number <= -3) bounds the reward from below, as the module docstring says."""
    answer = parse_answer(text, reference_card_parsing=reference_card_parsing)
    if not language_only and sorted(answer.cards) != puzzle._sorted_symbols:
        return Verdict(_VISION[0], _VISION[1], "INCORRECT_VISION", (_VISION,), answer)
    verdict = Verdict(*check_formula(answer.formula, puzzle, exact=exact), answer)
    if reward_floor is not None:
        check_reward_floor(reward_floor)
        if verdict.reward < reward_floor:
            floor = (float(reward_floor) - verdict.reward, FLOOR_MESSAGE)
            verdict = verdict._replace(reward=float(reward_floor), penalties=(*verdict.penalties, floor))
    return verdict


def check_reward_floor(value: Any) -> None:
    """A floor must be a finite number <= -3 (ILLEGAL_FORMULA): it never changes a single table entry."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > REWARDS["ILLEGAL_FORMULA"]:
        raise ValueError(f"reward_floor must be a finite number <= -3 (or None for the paper's rewards), got {value!r}")


def score_many(
    texts: Sequence[Any],
    puzzles: Puzzle | Sequence[Puzzle],
    *,
    language_only: bool = True,
    exact: bool = True,
    reference_card_parsing: bool = False,
    reward_floor: float | None = None,
) -> list[Verdict]:
    """Batch form of `score`: one puzzle for all texts, or one puzzle per text."""
    if isinstance(puzzles, Puzzle):
        puzzles = [puzzles] * len(texts)
    elif len(puzzles) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(puzzles)} puzzles")
    kw = dict(
        language_only=language_only,
        exact=exact,
        reference_card_parsing=reference_card_parsing,
        reward_floor=reward_floor,
    )
    return [score(t, p, **kw) for t, p in zip(texts, puzzles)]

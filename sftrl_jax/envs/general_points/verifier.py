"""GeneralPoints verifier: model text -> reward and message, the reward table of SPEC §1.6.

Pure functions over plain data; never executes model text and never raises on it. The stages, in the
reference's order, with its rewards and messages:

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

Messages are joined with ", " and end with ".". Deliberate differences from the reference code
(docs/GENERAL_POINTS.md): evaluation is exact over rationals (`exact=False` restores its float `==`,
under which e.g. "8/(3-8/3)" is never correct); unquoted integer card lists, JSON lists and
double-quoted symbols are read as cards (`reference_card_parsing=True` restores the reference, which
reads all three as no cards at all); a non-string JSON "formula" scores -3 (the reference crashes).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

from sftrl_jax.envs.general_points import solver

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

MAX_NESTING = 200  # CPython's parser refuses more than 200 open parentheses: so do we
_FAST_GRAMMAR_CHARS = 512  # longer formulas take the plain linear grammar loop
_CACHED_FORMULA_CHARS = 256  # only short formulas go into the per-hand result cache

_FIELD_PATTERNS = {
    "cards": re.compile(r'"cards": \[([^\]]+)\]'),
    "number": re.compile(r'"number": \[([^\]]+)\]'),
    "formula": re.compile(r'"formula": "(.*?)"'),
}
_JSON_WS = " \t\n\r"
_JSON_START = re.compile(r"[ \t\n\r]*\{")
_LEGAL = re.compile(r"[\d+\-*/()]*")
_TOKEN = re.compile(r"\d+|[+\-*/()]")
_NUMBER = re.compile(r"\d+")
# Token sequences with no grammar violation (parentheses matched separately): prefixes of
# operand (op operand)* where an operand is `(* number )*`.
_GRAMMAR_OK = re.compile(r"(?:\(*\d+\)*[+\-*/])*\(*(?:\d+\)*)?")
_OPERATORS = "+-*/"
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_NOT_OPERAND = frozenset("+-*/)")


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


class Answer:
    """The fields read from model text. `formula` is None when the JSON value is not a string; `cards`
    and `numbers` (lists of 4 strings, or []) are read on first access."""

    __slots__ = ("_text", "_obj", "_reference", "formula", "_cards", "_numbers")

    def __init__(self, text: str, obj: dict | None, formula: str | None, reference_card_parsing: bool):
        self._text, self._obj, self._reference, self.formula = text, obj, reference_card_parsing, formula
        self._cards = self._numbers = None

    @property
    def cards(self) -> list[str]:
        if self._cards is None:
            self._cards = _read_cards(self._obj, self._text, reference=self._reference)
        return self._cards

    @property
    def numbers(self) -> list[str]:
        if self._numbers is None:
            self._numbers = _read_numbers(self._obj, self._text)
        return self._numbers

    def __repr__(self) -> str:
        return f"Answer(formula={self.formula!r}, cards={self.cards!r}, numbers={self.numbers!r})"


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


# ----------------------------------------------------------------------------------------------- parsing


def _json_object(text: str) -> dict | None:
    """`json.loads(text)` if that gives a dict; None otherwise, skipping the call when it must fail."""
    if _JSON_START.match(text) is None:
        return None
    body = text.rstrip(_JSON_WS)
    if body.endswith("}") and body[:-1].rstrip(_JSON_WS).endswith(","):
        return None  # the trained answer format: a trailing comma is never valid JSON
    try:
        obj = json.loads(text)
    except Exception:  # ValueError, RecursionError on deep nesting, ...
        return None
    return obj if isinstance(obj, dict) else None


def _clean_list(text: str, *, strip_double_quotes: bool) -> list[str]:
    """The reference's list cleaner: drop brackets, single quotes and spaces, split on commas, 4 or []."""
    text = text.replace("[", "").replace("]", "").replace("'", "").replace(" ", "")
    if strip_double_quotes:
        text = text.replace('"', "")
    items = text.split(",")
    return items if len(items) == 4 else []


def _read_cards(obj: dict | None, text: str, *, reference: bool) -> list[str]:
    if obj is not None and "cards" in obj:
        raw = obj["cards"]
        if isinstance(raw, str):
            return _clean_list(raw, strip_double_quotes=not reference)
        if reference or not isinstance(raw, list) or len(raw) != 4:
            return []
        return [str(x).replace(" ", "") for x in raw]
    match = _FIELD_PATTERNS["cards"].search(text)
    if match is None:
        return []
    content = match.group(1)
    if reference:
        try:  # the reference turns an all-integer list into ints, which its cleaner then rejects
            [int(x) for x in content.split(", ")]
            return []
        except ValueError:
            pass
    return _clean_list("[" + content + "]", strip_double_quotes=not reference)


def _read_numbers(obj: dict | None, text: str) -> list[str]:
    if obj is not None and "number" in obj:
        raw = obj["number"]
        return _clean_list(raw, strip_double_quotes=False) if isinstance(raw, str) else []
    match = _FIELD_PATTERNS["number"].search(text)
    return [] if match is None else _clean_list(match.group(1), strip_double_quotes=False)


def _read_formula(obj: dict | None, text: str) -> str | None:
    if obj is not None and "formula" in obj:
        raw = obj["formula"]
        return raw.split("=", 1)[0] if isinstance(raw, str) else None
    match = _FIELD_PATTERNS["formula"].search(text)
    return "None" if match is None else match.group(1).split("=", 1)[0]


def parse_answer(text: Any, *, reference_card_parsing: bool = False) -> Answer:
    """Reads "formula", "cards" and "number" from model text the way the reference does."""
    if not isinstance(text, str):
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    obj = _json_object(text)
    return Answer(text, obj, _read_formula(obj, text), reference_card_parsing)


# -------------------------------------------------------------------------------------------- evaluation


class _Unparsable(Exception):
    """What Python's `eval` would reject (syntax) or fail on (division by zero)."""


def _leaf(token: str, exact: bool):
    # Python source accepts only ASCII digits and no leading zeros ("00" is fine, "06" is not).
    if not token.isascii() or (len(token) > 1 and token[0] == "0" and token.strip("0")):
        raise _Unparsable(token)
    return (int(token), 1) if exact else int(token)


def _apply(op: str, a, b, exact: bool):
    if exact:  # (numerator, denominator) pairs of ints: exact and cheaper than Fraction objects
        (n1, d1), (n2, d2) = a, b
        if op == "+":
            return n1 * d2 + n2 * d1, d1 * d2
        if op == "-":
            return n1 * d2 - n2 * d1, d1 * d2
        if op == "*":
            return n1 * n2, d1 * d2
        if n2 == 0:
            raise _Unparsable("division by zero")
        return n1 * d2, d1 * n2
    try:  # Python's own int/float semantics, exactly what the reference's eval computes
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        return a / b
    except (ZeroDivisionError, OverflowError) as e:
        raise _Unparsable(str(e)) from None


def _reduce(values: list, ops: list[str], exact: bool) -> None:
    b = values.pop()
    values[-1] = _apply(ops.pop(), values[-1], b, exact)


def _postfix(tokens: Sequence[str]) -> tuple[str, ...]:
    """Operator-precedence parse (explicit stacks, no recursion) -> postfix program; numbers appear as
    "n" in reading order. Raises _Unparsable where Python's parser would raise a SyntaxError."""
    out: list[str] = []
    ops: list[str] = []
    depth = 0
    want_operand = True
    for tok in tokens:
        if want_operand:
            if tok == "(":
                depth += 1
                if depth > MAX_NESTING:
                    raise _Unparsable("too many nested parentheses")
                ops.append(tok)
            elif tok in _NOT_OPERAND:
                raise _Unparsable(tok)
            else:
                out.append("n")
                want_operand = False
        elif tok == ")":
            while ops and ops[-1] != "(":
                out.append(ops.pop())
            if not ops:
                raise _Unparsable("unmatched ')'")
            ops.pop()
            depth -= 1
        elif tok in _PRECEDENCE:
            prec = _PRECEDENCE[tok]
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= prec:
                out.append(ops.pop())
            ops.append(tok)
            want_operand = True
        else:
            raise _Unparsable(tok)
    if want_operand or "(" in ops:
        raise _Unparsable("unexpected end")
    out.extend(reversed(ops))
    return tuple(out)


# formula shape (digits replaced by '0') -> postfix program, or the _Unparsable it raised
_PLANS: dict[str, tuple[str, ...] | _Unparsable] = {}
_PLANS_MAX = 1 << 14
_SHAPE_TABLE = str.maketrans("0123456789", "0000000000")


def _plan(formula: str, tokens: Sequence[str] | None = None) -> tuple[str, ...]:
    """The postfix program of a formula, cached by its shape: answers share a few hundred shapes."""
    shape = formula.translate(_SHAPE_TABLE)  # non-ASCII digits stay: their leaves are rejected anyway
    plan = _PLANS.get(shape)
    if plan is None:
        try:
            plan = _postfix(_TOKEN.findall(formula) if tokens is None else tokens)
        except _Unparsable as e:
            plan = e
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[shape] = plan
    if isinstance(plan, _Unparsable):
        raise plan
    return plan


def _run(plan: tuple[str, ...], numbers: Sequence, exact: bool):
    """Runs a postfix program on the numbers (already leaves: (n, 1) pairs if exact, else ints)."""
    stack: list = []
    it = iter(numbers)
    for step in plan:
        if step == "n":
            stack.append(next(it))
        else:
            b = stack.pop()
            stack[-1] = _apply(step, stack[-1], b, exact)
    return stack[0]


def _evaluate_tokens(tokens: Sequence[str], exact: bool):
    """Value of a token list; raises _Unparsable where Python's `eval` would raise."""
    plan = _postfix(tokens)
    return _run(plan, [_leaf(t, exact) for t in tokens if t[0] not in _NOT_OPERAND and t != "("], exact)


def evaluate(formula: str, *, exact: bool = True) -> Fraction | int | float | None:
    """Value of an arithmetic formula (digits, + - * / and parentheses), or None where Python's `eval`
    would raise. Exact (a Fraction) by default; `exact=False` gives Python's own int/float result."""
    if not isinstance(formula, str) or not _LEGAL.fullmatch(formula):
        return None
    try:
        value = _evaluate_tokens(_TOKEN.findall(formula), exact)
    except _Unparsable:
        return None
    return Fraction(*value) if exact else value


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
    for tok in _TOKEN.findall(formula):
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


_list_text = repr  # "[4, 10]", as the reference prints its int lists


def _number_penalties(numbers: list[str], puzzle: Puzzle) -> list[tuple[float, str]]:
    used: dict[int | str, int] = {}
    for tok in numbers:
        n = _int_token(tok)
        used[n] = used.get(n, 0) + 1
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
    for tok in _TOKEN.findall(formula):
        previous, register = register, register + tok
        if register not in prefixes:
            if previous:
                message = f"{previous} is partially correct but the full formula does not match any solution"
            else:
                message = "your formula does not match any solution"
            return ((REWARDS["NO_SOLUTION"], message),)
    return ()


def _penalties(formula: str | None, puzzle: Puzzle, exact: bool) -> tuple[tuple[float, str], ...]:
    """The reference's `step_rewards` after the card check: the (reward, message) items of one formula."""
    if formula is None:
        return ((REWARDS["ILLEGAL_FORMULA"], "illegal characters"),)
    if exact and formula in puzzle.solution_set:  # legal, grammatical, the card numbers, exactly the target
        return ((REWARDS["CORRECT"], "Correct solution"),)
    if not _LEGAL.fullmatch(formula):
        return ((REWARDS["ILLEGAL_FORMULA"], "illegal characters"),)
    penalties = _grammar_penalties(formula)
    numbers = _NUMBER.findall(formula)
    plain = sorted(numbers) == puzzle._value_texts  # exactly the card numbers, written plainly
    if not plain:
        penalties += _number_penalties(numbers, puzzle)
    if penalties:
        return tuple(penalties)
    try:
        if plain:  # ASCII digits without leading zeros: no leaf can be rejected
            leaves = [(int(t), 1) for t in numbers] if exact else [int(t) for t in numbers]
        else:
            leaves = [_leaf(t, exact) for t in numbers]
        value = _run(_plan(formula), leaves, exact)
        if (value[0] == puzzle.target * value[1]) if exact else (value == puzzle.target):
            return ((REWARDS["CORRECT"], "Correct solution"),)
    except _Unparsable:
        if formula in puzzle.prefixes:
            return ((REWARDS["PARTIAL"], "partial solution"),)
    return _prefix_walk(formula, puzzle.prefixes)


# (formula, values, target, exact) -> (reward, message, outcome, penalties); cleared when full.
_RESULTS: dict[tuple, tuple[float, str, str, tuple[tuple[float, str], ...]]] = {}
_RESULTS_MAX = 1 << 16


def clear_cache() -> None:
    """Forgets cached results and evaluation plans (for benchmarks; results never go stale)."""
    _RESULTS.clear()
    _PLANS.clear()


def _result(penalties: tuple[tuple[float, str], ...]) -> tuple[float, str, str, tuple]:
    if len(penalties) == 1:  # the common case, without the generic joins
        reward, message = penalties[0]
        return reward, message + ".", _OUTCOME_OF.get(reward, "AGGREGATED_ERROR"), penalties
    reward = float(sum([r for r, _ in penalties]))
    return reward, ", ".join([m for _, m in penalties]) + ".", outcome_of(reward), penalties


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
) -> Verdict:
    """Scores one model turn. Never raises on any text."""
    answer = parse_answer(text, reference_card_parsing=reference_card_parsing)
    if not language_only and sorted(answer.cards) != puzzle._sorted_symbols:
        return Verdict(_VISION[0], _VISION[1], "INCORRECT_VISION", (_VISION,), answer)
    return Verdict(*check_formula(answer.formula, puzzle, exact=exact), answer)


def score_many(
    texts: Sequence[Any],
    puzzles: Puzzle | Sequence[Puzzle],
    *,
    language_only: bool = True,
    exact: bool = True,
    reference_card_parsing: bool = False,
) -> list[Verdict]:
    """Batch form of `score`: one puzzle for all texts, or one puzzle per text."""
    if isinstance(puzzles, Puzzle):
        puzzles = [puzzles] * len(texts)
    elif len(puzzles) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(puzzles)} puzzles")
    kw = dict(language_only=language_only, exact=exact, reference_card_parsing=reference_card_parsing)
    return [score(t, p, **kw) for t, p in zip(texts, puzzles)]

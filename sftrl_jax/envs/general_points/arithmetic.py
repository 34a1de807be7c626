"""Safe exact arithmetic for GP formulas: what the reference's `eval` computes, without running text.

Formulas are digit runs, `+ - * /` and parentheses. They are parsed by operator precedence with explicit
stacks (no recursion) into a postfix program, cached per formula shape, and run over exact rationals
(int numerator/denominator pairs) or, with `exact=False`, over Python's own ints and floats (the value
`eval` would give, float rounding included). Whatever `eval` rejects is rejected too: an unclosed '(',
a trailing operator, a number with a leading zero ("06"), non-ASCII digits, more than 200 nested
parentheses, a division by zero.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

LEGAL = re.compile(r"[\d+\-*/()]*")  # the reference's token regex covers the whole string
TOKEN = re.compile(r"\d+|[+\-*/()]")
NUMBER = re.compile(r"\d+")
MAX_NESTING = 200  # CPython's parser refuses more than 200 open parentheses: so do we
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_NOT_OPERAND = frozenset("+-*/)")


class Unparsable(Exception):
    """What Python's `eval` would reject (syntax) or fail on (division by zero)."""


def leaf(token: str, exact: bool):
    # Python source accepts only ASCII digits and no leading zeros ("00" is fine, "06" is not).
    if not token.isascii() or (len(token) > 1 and token[0] == "0" and token.strip("0")):
        raise Unparsable(token)
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
            raise Unparsable("division by zero")
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
        raise Unparsable(str(e)) from None


def _postfix(tokens: Sequence[str]) -> tuple[str, ...]:
    """Operator-precedence parse (explicit stacks, no recursion) -> postfix program; numbers appear as
    "n" in reading order. Raises Unparsable where Python's parser would raise a SyntaxError."""
    out: list[str] = []
    ops: list[str] = []
    depth = 0
    want_operand = True
    for tok in tokens:
        if want_operand:
            if tok == "(":
                depth += 1
                if depth > MAX_NESTING:
                    raise Unparsable("too many nested parentheses")
                ops.append(tok)
            elif tok in _NOT_OPERAND:
                raise Unparsable(tok)
            else:
                out.append("n")
                want_operand = False
        elif tok == ")":
            while ops and ops[-1] != "(":
                out.append(ops.pop())
            if not ops:
                raise Unparsable("unmatched ')'")
            ops.pop()
            depth -= 1
        elif tok in _PRECEDENCE:
            prec = _PRECEDENCE[tok]
            while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= prec:
                out.append(ops.pop())
            ops.append(tok)
            want_operand = True
        else:
            raise Unparsable(tok)
    if want_operand or "(" in ops:
        raise Unparsable("unexpected end")
    out.extend(reversed(ops))
    return tuple(out)


# formula shape (digits replaced by '0') -> postfix program (a tuple), or why it cannot be parsed (a str)
_PLANS: dict[str, tuple[str, ...] | str] = {}
_PLANS_MAX = 1 << 14
_CACHED_SHAPE_CHARS = 256  # longer shapes are parsed each time: 16K cached 1 MB keys would be 16 GB
_SHAPE_TABLE = str.maketrans("0123456789", "0000000000")


def plan_of(formula: str, tokens: Sequence[str] | None = None) -> tuple[str, ...]:
    """The postfix program of a formula, cached by its shape: answers share a few hundred shapes."""
    shape = formula.translate(_SHAPE_TABLE)  # non-ASCII digits stay: their leaves are rejected anyway
    plan = _PLANS.get(shape)
    if plan is None:
        try:
            # tokens lazily: the parse stops at the first error (e.g. 201 open parentheses of 1 MB)
            plan = _postfix((m.group() for m in TOKEN.finditer(formula)) if tokens is None else tokens)
        except Unparsable as e:
            plan = str(e)
        if len(shape) <= _CACHED_SHAPE_CHARS:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            _PLANS[shape] = plan
    if plan.__class__ is str:
        raise Unparsable(plan)
    return plan


def run(plan: tuple[str, ...], numbers: Sequence, exact: bool):
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


def evaluate_tokens(tokens: Sequence[str], exact: bool):
    """Value of a token list; raises Unparsable where Python's `eval` would raise."""
    plan = _postfix(tokens)
    return run(plan, [leaf(t, exact) for t in tokens if t[0] not in _NOT_OPERAND and t != "("], exact)


def evaluate(formula: str, *, exact: bool = True) -> Fraction | int | float | None:
    """Value of an arithmetic formula (digits, + - * / and parentheses), or None where Python's `eval`
    would raise. Exact (a Fraction) by default; `exact=False` gives Python's own int/float result."""
    if not isinstance(formula, str) or not LEGAL.fullmatch(formula):
        return None
    try:
        value = evaluate_tokens(TOKEN.findall(formula), exact)
    except Unparsable:
        return None
    return Fraction(*value) if exact else value


def clear_plans() -> None:
    _PLANS.clear()

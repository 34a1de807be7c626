"""The reference's grammar pass over a long formula, vectorised: model text is untrusted input and a
1 MB answer of operators is 2**20 violations, which the token loop takes ~0.3 s to walk.

The rules are the reference's (SPEC §1.6, `verifier._grammar_penalties` is the token loop they must
equal): over the tokens `\\d+|[+\\-*/()]`, with "after an operand" meaning the previous token is a
number or ')',

1. a number after an operand                                  "invalid sequence after number"
2. an operator not after an operand (or first)                "invalid sequence after operator"
3. '(' after an operand (it does not count as open then)      "invalid sequence before '('"
4. ')' not after an operand                                   "invalid sequence after ')'"
5. ')' after an operand with no '(' open                      "unmatched closing parenthesis"

The open count is c_i = max(0, c_(i-1) + d_i) with d = +1 for a counted '(' and -1 for a ')' after an
operand; as a clamped running sum it is S_i - min(0, min_(j<=i) S_j) with S the prefix sums of d.
"""

from __future__ import annotations

import numpy as np

MESSAGES = (
    "",
    "invalid sequence after number",
    "invalid sequence after operator",
    "invalid sequence before '('",
    "invalid sequence after ')'",
    "unmatched closing parenthesis",
)
_NONE, _NUMBER, _OPERATOR, _OPEN, _CLOSE = range(5)


def violations(formula: str) -> np.ndarray:
    """The rule number (1-5 above) of each violation, in token order. `formula` must be legal: only
    (Unicode) digits and `+ - * / ( )`, as `arithmetic.LEGAL` checks first."""
    chars = np.frombuffer(formula.encode("utf-32-le"), dtype="<u4")
    kind = np.full(chars.shape, _NUMBER, np.int8)
    kind[(chars == ord("+")) | (chars == ord("-")) | (chars == ord("*")) | (chars == ord("/"))] = _OPERATOR
    kind[chars == ord("(")] = _OPEN
    kind[chars == ord(")")] = _CLOSE
    number = kind == _NUMBER
    starts = np.ones(chars.shape, bool)
    starts[1:] = ~(number[1:] & number[:-1])  # a digit run is one token
    tokens = kind[starts]
    prev = np.empty_like(tokens)
    prev[:1] = _NONE
    prev[1:] = tokens[:-1]
    after = (prev == _NUMBER) | (prev == _CLOSE)
    rule = np.zeros(tokens.shape, np.int8)
    rule[(tokens == _NUMBER) & after] = 1
    rule[(tokens == _OPERATOR) & ~after] = 2
    rule[(tokens == _OPEN) & after] = 3
    rule[(tokens == _CLOSE) & ~after] = 4
    closing = (tokens == _CLOSE) & after
    step = np.zeros(tokens.shape, np.int64)
    step[(tokens == _OPEN) & ~after] = 1
    step[closing] = -1
    sums = np.cumsum(step)
    open_after = sums - np.minimum(np.minimum.accumulate(sums), 0)
    open_before = np.empty_like(open_after)
    open_before[:1] = 0
    open_before[1:] = open_after[:-1]
    rule[closing & (open_before == 0)] = 5
    return rule[rule != 0]

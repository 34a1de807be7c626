"""The GP formula check of `verifier.py` over a packed formula of code points, as jnp array code.

`check(F, n, puzzle arrays)` -> reward [B] float32 for formulas F [B, M] int32 (code points, the
first n count), in the host's order: characters (only digits, Unicode Nd included as Python's `\\d`,
and `+ - * / ( )`), then the grammar (one -3 per violation; the unmatched-')' count is the saturating
counter of the host's loop, closed form: minus the least prefix sum), then the card multiset (two -2
rules), then, with no penalty, exact evaluation and the solution-prefix rules.

Evaluation: with no penalty a formula has exactly the four card numbers and no grammar violation, so
its tree is one of the five shapes over four leaves; the root of a span is its operator of least
(2 * paren depth + precedence), the rightmost on ties (left associativity), as the host's
operator-precedence parse builds it. Values are unreduced rationals n/d in int32 exactly as
`arithmetic._apply` forms them: with leaves <= 100 every |n|, |d| <= 8 * 100**4 < 2**31, so nothing
overflows (cards are 1..13); the target test n == target * d is done as d | n and n // d == target
so that it cannot overflow either. What the host's parser rejects (an unclosed '(', a trailing
operator, more than `MAX_NESTING` open parentheses, a leading zero, a non-ASCII digit, a division by
zero) is "unparsable", as there.
"""

from __future__ import annotations

import jax.numpy as jnp

from sftrl_jax.envs import device_text as dt
from sftrl_jax.envs.general_points import arithmetic, verifier

R = verifier.REWARDS
SOLUTION_CHARS = 16  # longest solution string: 15 characters ("(10+10)+(10+10)")
_BIG = 1000  # token values at or above this are never a card
_NUM, _OP, _OPEN, _CLOSE = 1, 2, 3, 4
_OP_CODES = {ord("+"): 0, ord("-"): 1, ord("*"): 2, ord("/"): 3}


def _apply(op, a, b):
    """a op b on (n, d) int32 pairs, as `arithmetic._apply`; also whether it divides by zero."""
    (n1, d1), (n2, d2) = a, b
    n = jnp.select([op == 0, op == 1, op == 2], [n1 * d2 + n2 * d1, n1 * d2 - n2 * d1, n1 * n2], n1 * d2)
    d = jnp.where(op == 3, d1 * n2, d1 * d2)
    return (n, d), (op == 3) & (n2 == 0)


def _evaluate(leaves, ops, prio):
    """Value (n, d) and division-by-zero flag of 4 leaves [B, 4] with 3 operators, by priorities."""
    a, b, c, d = ((leaves[:, i], jnp.ones_like(leaves[:, i])) for i in range(4))
    o0, o1, o2 = ops[:, 0], ops[:, 1], ops[:, 2]
    p0, p1, p2 = prio[:, 0], prio[:, 1], prio[:, 2]

    ab, z_ab = _apply(o0, a, b)
    bc, z_bc = _apply(o1, b, c)
    cd, z_cd = _apply(o2, c, d)
    shapes = []
    v, z = _apply(o1, ab, c)
    v, z2 = _apply(o2, v, d)
    shapes.append((v, z_ab | z | z2))  # ((a b) c) d
    v, z = _apply(o0, a, bc)
    v, z2 = _apply(o2, v, d)
    shapes.append((v, z_bc | z | z2))  # (a (b c)) d
    v, z = _apply(o1, ab, cd)
    shapes.append((v, z_ab | z_cd | z))  # (a b) (c d)
    v, z = _apply(o2, bc, d)
    v, z2 = _apply(o0, a, v)
    shapes.append((v, z_bc | z | z2))  # a ((b c) d)
    v, z = _apply(o1, b, cd)
    v, z2 = _apply(o0, a, v)
    shapes.append((v, z_cd | z | z2))  # a (b (c d))
    root2 = (p2 <= p0) & (p2 <= p1)
    root1 = ~root2 & (p1 <= p0)
    shape = jnp.where(root2, jnp.where(p1 <= p0, 0, 1), jnp.where(root1, 2, jnp.where(p2 <= p1, 3, 4)))
    n = jnp.select([shape == i for i in range(5)], [s[0][0] for s in shapes])
    den = jnp.select([shape == i for i in range(5)], [s[0][1] for s in shapes])
    zero = jnp.select([shape == i for i in range(5)], [s[1] for s in shapes])
    return n, den, zero


def _is_prefix(F, n, solutions, solution_len):
    """The formula is a prefix of one of the solution strings [B, S, 16] (lengths [B, S], -1 = none)."""
    head = F[:, :SOLUTION_CHARS]
    j = jnp.arange(SOLUTION_CHARS)
    same = (solutions == head[:, None, :]) | (j[None, None] >= n[:, None, None])
    return jnp.any(jnp.all(same, axis=2) & (solution_len >= n[:, None]), axis=1) & (n <= SOLUTION_CHARS)


def check(F, n, values, target, solutions, solution_len):
    """Reward [B] float32 of the formulas F [B, M] (n [B] code points each) for the hands' puzzle arrays."""
    M = F.shape[1]
    valid = jnp.arange(M)[None] < n[:, None]
    F = jnp.where(valid, F, -1)
    dv = dt.digit_value(F)
    kind = jnp.select(
        [dv >= 0, (F == 43) | (F == 45) | (F == 42) | (F == 47), F == 40, F == 41], [_NUM, _OP, _OPEN, _CLOSE], 0
    )
    kind = jnp.where(valid, kind, 0)
    legal = jnp.all(~valid | (kind > 0), axis=1)
    prev = dt.shift(kind, -1, 0)
    after_operand = (prev == _NUM) | (prev == _CLOSE)
    is_d, is_op = kind == _NUM, kind == _OP
    num_start = is_d & (prev != _NUM)
    ok_open = (kind == _OPEN) & ~after_operand
    ok_close = (kind == _CLOSE) & after_operand
    bad = (num_start & (prev == _CLOSE)) | (is_op & ~after_operand)
    bad |= ((kind == _OPEN) & after_operand) | ((kind == _CLOSE) & ~after_operand)
    level = jnp.cumsum(ok_open.astype(jnp.int32) - ok_close, axis=1)
    unmatched = -jnp.minimum(jnp.min(level, axis=1), 0)
    violations = jnp.sum(bad, axis=1) + unmatched

    # numbers: value (saturated at _BIG), ASCII-ness and leading zero of each digit run
    run_end = dt.next_index(is_d & (dt.shift(kind, 1, 0) != _NUM))
    r = run_end - dt.positions(F)
    contrib = jnp.where(
        is_d, jnp.where(r < 3, dv * jnp.where(r == 0, 1, jnp.where(r == 1, 10, 100)), _BIG * (dv > 0)), 0
    )
    cs = jnp.cumsum(contrib, axis=1)
    cn = jnp.cumsum(is_d & (F > 127), axis=1)
    before = lambda c: dt.at(c, dt.positions(F) - 1)  # noqa: E731
    value = jnp.minimum(dt.at(cs, run_end) - before(cs), _BIG)
    non_ascii = dt.at(cn, run_end) - before(cn) > 0
    leading_zero = (dv == 0) & (run_end > dt.positions(F))
    eq = num_start[..., None] & (value[..., None] == values[:, None, :])  # [B, M, 4]
    invalid = jnp.any(num_start & ~jnp.any(eq, axis=2), axis=1)
    used = jnp.sum(eq, axis=1)  # [B, 4]
    avail = jnp.sum(values[:, :, None] == values[:, None, :], axis=2)
    number_pen = R["INCORRECT_NUMBER"] * ((invalid | jnp.any(used > avail, axis=1)).astype(jnp.float32))
    number_pen += R["INCORRECT_NUMBER"] * jnp.any(used < avail, axis=1)
    penalty = R["ILLEGAL_FORMULA"] * violations.astype(jnp.float32) + number_pen

    # evaluation (used only where there is no penalty: 4 numbers, grammatical)
    leaves, _ = dt.compact(num_start, value, 4, fill=0)
    rejected = jnp.any(num_start & (non_ascii | leading_zero), axis=1)
    opcode = jnp.select([F == c for c in _OP_CODES], list(_OP_CODES.values()), 0)
    prio = 2 * level + (opcode >= 2)
    ops, n_ops = dt.compact(is_op, opcode, 3, fill=0)
    prios, _ = dt.compact(is_op, prio, 3, fill=0)
    num, den, zero = _evaluate(leaves, ops, prios)
    final_level = jnp.sum(ok_open, axis=1) - jnp.sum(ok_close, axis=1)
    unparsable = (n_ops != 3) | (final_level != 0) | (jnp.max(level, axis=1) > arithmetic.MAX_NESTING)
    unparsable |= rejected | zero
    den = jnp.where(den == 0, 1, den)
    correct = ~unparsable & (num % den == 0) & (num // den == target)
    prefix = _is_prefix(F, n, solutions, solution_len)
    graded = jnp.where(
        correct, R["CORRECT"], jnp.where(prefix, jnp.where(unparsable, R["PARTIAL"], 0.0), R["NO_SOLUTION"])
    )
    reward = jnp.where(penalty != 0, penalty, graded)
    return jnp.where(legal, reward, R["ILLEGAL_FORMULA"]).astype(jnp.float32)

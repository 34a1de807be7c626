"""Exact solver for four numbers and a target: every solution string in the reference's notation.

The reference enumerates every distinct ordering of the four numbers, every triple of operators from
'+-*/' and seven fixed bracket placements (none, (ab)cd, (abc)d, a(bc)d, a(bcd), ab(cd), (ab)(cd)),
and keeps each string whose exact value equals the target, e.g. "(10*10-4)/4". The verifier's partial
credit compares model formulas against these strings by prefix, so we produce exactly the same set.

Instead of evaluating 10,752 strings one by one, each (bracket placement, operator triple) is mapped
once to one of the five binary-tree shapes over the ordered leaves a, b, c, d; each shape is then
evaluated for all orderings and operator triples at once with numpy, as exact rationals held in int64
numerator/denominator pairs (no float rounding; the largest component is max(value)**5, far inside int64
for numbers <= 100 and |target| <= 10**6). Results are cached per sorted multiset of values (at most
1,820 multisets of 1..13 per target), so dealing is cheap.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np

OPERATORS = "+-*/"
# The seven bracket placements of the reference, in its order; {0}..{3} are numbers, {o0}..{o2} operators.
PATTERNS = (
    "{0}{o0}{1}{o1}{2}{o2}{3}",
    "({0}{o0}{1}){o1}{2}{o2}{3}",
    "({0}{o0}{1}{o1}{2}){o2}{3}",
    "{0}{o0}({1}{o1}{2}){o2}{3}",
    "{0}{o0}({1}{o1}{2}{o2}{3})",
    "{0}{o0}{1}{o1}({2}{o2}{3})",
    "({0}{o0}{1}){o1}({2}{o2}{3})",
)
OP_TRIPLES = tuple(itertools.product(OPERATORS, repeat=3))  # 64, in the reference's order
_MAX_VALUE = 100
_MAX_TARGET = 10**6

# Tree shapes over ordered leaves 0..3 with operators o0, o1, o2 in reading order.
_SHAPES = (
    ((0, 1), 2, 3),  # ((a b) c) d
    ((0, (1, 2)), 3),  # (a (b c)) d
    ((0, 1), (2, 3)),  # (a b) (c d)
    (0, ((1, 2), 3)),  # a ((b c) d)
    (0, (1, (2, 3))),  # a (b (c d))
)


def _normalise(tree):
    """Nested tuples -> strictly binary nested pairs, so shape keys compare equal."""
    if isinstance(tree, int):
        return tree
    if len(tree) == 3:
        return ((_normalise(tree[0]), _normalise(tree[1])), _normalise(tree[2]))
    return (_normalise(tree[0]), _normalise(tree[1]))


_SHAPE_INDEX = {_normalise(s): i for i, s in enumerate(_SHAPES)}


def _parse_shape(pattern: str, ops: tuple[str, str, str]) -> int:
    """Tree shape (index into _SHAPES) of one pattern with one operator triple, by operator precedence."""
    text = pattern.format("0", "1", "2", "3", o0=ops[0], o1=ops[1], o2=ops[2])
    pos = 0

    def expr(prec_ops: str):
        nonlocal pos
        node = term() if prec_ops == "+-" else factor()
        while pos < len(text) and text[pos] in prec_ops:
            pos += 1
            node = (node, term() if prec_ops == "+-" else factor())
        return node

    def term():
        return expr("*/")

    def factor():
        nonlocal pos
        if text[pos] == "(":
            pos += 1
            node = expr("+-")
            pos += 1  # ')'
            return node
        pos += 1
        return int(text[pos - 1])

    return _SHAPE_INDEX[_normalise(expr("+-"))]


# [7 patterns, 64 operator triples] -> shape index
_PATTERN_SHAPE = np.array([[_parse_shape(p, ops) for ops in OP_TRIPLES] for p in PATTERNS], dtype=np.int64)
# Format strings with the operators already filled in: _TEMPLATES[pattern][triple].format(a, b, c, d)
_TEMPLATES = tuple(
    tuple(p.replace("{o0}", o0).replace("{o1}", o1).replace("{o2}", o2) for o0, o1, o2 in OP_TRIPLES) for p in PATTERNS
)


def _apply(x, y, axis: int):
    """Exact x `op` y for the four operators, concatenated along `axis` (size 1 in x and y).

    A value is a (numerator, denominator) pair of int64 arrays; denominator 0 marks an invalid value
    (a division by zero somewhere below) and stays 0 through every later operation: x/y is computed as
    (n1 d2 d2) / (d1 d2 n2), which equals n1 d2 / (d1 n2) whenever y is valid.
    """
    (n1, d1), (n2, d2) = x, y
    cross1, cross2, dd = n1 * d2, n2 * d1, d1 * d2
    n = np.concatenate((cross1 + cross2, cross1 - cross2, n1 * n2, cross1 * d2), axis=axis)
    d = np.concatenate((dd, dd, dd, dd * n2), axis=axis)
    return n, d


def _tree_values(perms: np.ndarray):
    """Values of the five tree shapes for every ordering and operator triple -> 2 arrays [5, P, 4, 4, 4].

    Axis 1 of the result is the ordering, axes 2, 3, 4 the operators o0, o1, o2.
    """
    size = len(perms)
    a, b, c, d = ((v, np.ones_like(v)) for v in (perms[:, i].reshape(size, 1, 1, 1) for i in range(4)))
    ab, bc, cd = _apply(a, b, 1), _apply(b, c, 2), _apply(c, d, 3)
    trees = (
        _apply(_apply(ab, c, 2), d, 3),  # ((a b) c) d
        _apply(_apply(a, bc, 1), d, 3),  # (a (b c)) d
        _apply(ab, cd, 2),  # (a b) (c d)
        _apply(a, _apply(bc, d, 3), 1),  # a ((b c) d)
        _apply(a, _apply(b, cd, 2), 1),  # a (b (c d))
    )
    return np.stack([t[0] for t in trees]), np.stack([t[1] for t in trees])


def _check(values: Sequence[int], target: int) -> tuple[int, ...]:
    if len(values) != 4:
        raise ValueError(f"the solver takes exactly 4 numbers, got {list(values)}")
    vals = tuple(int(v) for v in values)
    if any(not 0 <= v <= _MAX_VALUE for v in vals) or not -_MAX_TARGET <= int(target) <= _MAX_TARGET:
        raise ValueError(f"numbers must be in 0..{_MAX_VALUE} and |target| <= {_MAX_TARGET}, got {vals}, {target}")
    return tuple(sorted(vals))


@functools.lru_cache(maxsize=16384)
def _solve(sorted_values: tuple[int, ...], target: int) -> tuple[str, ...]:
    orderings = sorted(set(itertools.permutations(sorted_values)))
    n, d = _tree_values(np.array(orderings, dtype=np.int64))
    hit = ((d != 0) & (n == target * d)).reshape(len(_SHAPES), len(orderings), 64)  # [5, P, 64]
    # [P, 64, 7]: pattern k with triple o is a solution iff the value of its tree shape hits the target.
    by_pattern = hit[
        _PATTERN_SHAPE.T[None, :, :], np.arange(len(orderings))[:, None, None], np.arange(64)[None, :, None]
    ]
    texts = [tuple(str(v) for v in o) for o in orderings]
    return tuple(_TEMPLATES[k][o].format(*texts[p]) for p, o, k in zip(*(i.tolist() for i in np.nonzero(by_pattern))))


def solutions(values: Sequence[int], target: int = 24) -> tuple[str, ...]:
    """All distinct solution strings (reference notation), ordered by (ordering, operators, brackets)."""
    return _solve(_check(values, target), int(target))


def is_solvable(values: Sequence[int], target: int = 24) -> bool:
    return bool(solutions(values, target))


@functools.lru_cache(maxsize=16384)
def _prefixes(sorted_values: tuple[int, ...], target: int) -> frozenset[str]:
    return frozenset(sol[:i] for sol in _solve(sorted_values, target) for i in range(len(sol) + 1))


@functools.lru_cache(maxsize=16384)
def _solution_set(sorted_values: tuple[int, ...], target: int) -> frozenset[str]:
    return frozenset(_solve(sorted_values, target))


def solution_set(values: Sequence[int], target: int = 24) -> frozenset[str]:
    """The solution strings as a set, for O(1) membership tests."""
    return _solution_set(_check(values, target), int(target))


def prefixes(values: Sequence[int], target: int = 24) -> frozenset[str]:
    """Every prefix of every solution string (with "" when a solution exists), for O(1) prefix tests."""
    return _prefixes(_check(values, target), int(target))

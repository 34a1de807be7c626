"""Solver: the reference's solution strings, checked against independent brute force."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from sftrl_jax.envs.general_points import solver
from tests.envs import gp_reference as ref


def test_known_hands():
    assert solver.solutions((10, 10, 4, 4)) == ("(10*10-4)/4",)
    assert solver.solutions((3, 8, 3, 8)) == ("8/(3-8/3)",)
    assert solver.solutions((1, 1, 1, 1)) == ()
    assert len(solver.solutions((1, 1, 3, 6))) == 60
    assert "6*(3+1)*1" in solver.solutions((1, 1, 3, 6))
    assert solver.solutions((4, 4, 10, 10)) == solver.solutions((10, 4, 10, 4))  # order-free, cached
    assert solver.solutions((2, 3, 4, 5), 14) and "2+3+4+5" in solver.solutions((2, 3, 4, 5), 14)


@pytest.mark.parametrize(
    "values", [(1, 1, 3, 6), (3, 3, 8, 8), (1, 2, 3, 4), (13, 12, 11, 1), (5, 5, 5, 1), (7, 7, 3, 3), (12, 12, 12, 12)]
)
def test_same_strings_as_the_reference_enumeration(values):
    assert set(solver.solutions(values)) == ref.solutions_by_strings(values, 24)
    assert len(set(solver.solutions(values))) == len(solver.solutions(values))


def test_random_hands_against_string_enumeration():
    rng = random.Random(3)
    for _ in range(4):
        values = tuple(rng.randint(1, 13) for _ in range(4))
        target = rng.choice((24, 24, 10, 36))
        assert set(solver.solutions(values, target)) == ref.solutions_by_strings(values, target), (values, target)


def test_solvability_matches_complete_tree_search():
    """Over hands of both rules the reference's seven bracket placements decide solvability exactly as a
    complete search does (checked for every multiset offline; a random sample here)."""
    rng = random.Random(4)
    multisets = list(itertools.combinations_with_replacement(range(1, 14), 4))
    for ranks in rng.sample(multisets, 200):
        for values in (tuple(min(r, 10) for r in ranks), ranks):
            assert solver.is_solvable(values) == ref.solvable_by_tree_search(values, 24), values


def test_every_solution_evaluates_to_the_target():
    for values in [(1, 2, 3, 4), (13, 13, 2, 11), (6, 6, 6, 6)]:
        for sol in solver.solutions(values):
            assert ref.ast_value(sol, exact=True) == 24
            assert sorted(int(t) for t in re.findall(r"\d+", sol)) == sorted(values)


def test_prefixes():
    prefixes = solver.prefixes((10, 10, 4, 4))
    assert prefixes == {"(10*10-4)/4"[:i] for i in range(12)}
    assert solver.prefixes((1, 1, 1, 1)) == frozenset()


def test_bad_input():
    with pytest.raises(ValueError, match="exactly 4"):
        solver.solutions((1, 2, 3))
    with pytest.raises(ValueError, match="0..100"):
        solver.solutions((1, 2, 3, 1000))

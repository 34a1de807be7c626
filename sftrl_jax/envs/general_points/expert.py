"""Expert answers for SFT, in the reference's trained answer format (SPEC §1.5):

    {
      "cards": ['A', '3', 'K', '10'],
      "number": [1, 3, 10, 10],
      "formula": "(10*10-4)/4=24",
    }

(The trailing comma and single quotes make it invalid JSON on purpose: the verifier reads it with its
regexes, as the reference does.) The chosen solution is one the verifier scores +5 both with exact
arithmetic and with the reference's float `==`, whenever the hand has such a solution (almost always).

`dealt_order=True` prefers solutions that use the numbers in the order of the "number" field
(e.g. "4*(7-10/10)" for [4, 7, 10, 10]); about 60% of training hands have one. The formula then
copies the numbers left to right with operators and brackets between them, which a small model
learns far sooner than a random permutation (the CPU demo and the tiny SFT config use it).

`failed_attempt` writes a legal answer over exactly the dealt numbers whose value is wrong (the
verifier's -1), the first turn of a revision example (a failed try, the verifier's feedback, then
the expert answer), so that a small model also learns to answer again after feedback.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Sequence

import numpy as np

from sftrl_jax.envs.general_points import solver, verifier

ANSWER_FORMAT = '{{\n  "cards": {cards},\n  "number": {numbers},\n  "formula": "{formula}",\n}}'


def format_answer(symbols: Sequence[str], values: Sequence[int], formula: str, target: int = 24) -> str:
    """The answer text for a formula (without its '=target', which is appended here)."""
    return ANSWER_FORMAT.format(
        cards=repr([str(s) for s in symbols]), numbers=repr([int(v) for v in values]), formula=f"{formula}={target}"
    )


def float_exact(solution: str, target: int) -> bool:
    """True when Python float arithmetic (the reference's `eval`) also gives exactly `target`."""
    return verifier.evaluate(solution, exact=False) == target


@functools.lru_cache(maxsize=4096)
def _preferred(sorted_values: tuple[int, ...], target: int) -> tuple[str, ...]:
    sols = solver.solutions(sorted_values, target)
    return tuple(s for s in sols if float_exact(s, target)) or sols


def numbers_in(formula: str) -> list[int]:
    """The numbers of a formula, left to right: "4*(7-10/10)" -> [4, 7, 10, 10]."""
    return [int(x) for x in re.findall(r"\d+", formula)]


def choose_solution(
    values: Sequence[int],
    target: int = 24,
    rng: np.random.Generator | None = None,
    *,
    dealt_order: bool = False,
) -> str:
    """A solution string, preferring float-exact ones (and, with `dealt_order`, ones that use the
    numbers in the order given); random among them with `rng`, else the first."""
    pool = _preferred(tuple(sorted(int(v) for v in values)), int(target))
    if not pool:
        raise ValueError(f"numbers {list(values)} cannot make {target}")
    if dealt_order:
        order = [int(v) for v in values]
        pool = tuple(s for s in pool if numbers_in(s) == order) or pool
    return pool[int(rng.integers(len(pool)))] if rng is not None else pool[0]


def expert_answer(
    symbols: Sequence[str],
    values: Sequence[int],
    target: int = 24,
    rng: np.random.Generator | None = None,
    *,
    dealt_order: bool = False,
) -> str:
    """A full +5 answer for the hand (symbols and values in dealt order)."""
    return format_answer(symbols, values, choose_solution(values, target, rng, dealt_order=dealt_order), target)


def failed_attempt(
    symbols: Sequence[str],
    values: Sequence[int],
    target: int = 24,
    rng: np.random.Generator | None = None,
    avoid: Collection[str] = (),
) -> str:
    """A legal answer that uses every dealt number once, in dealt order, and misses `target`
    (reward -1: random operators and brackets, redrawn until the value is wrong and the answer is
    not in `avoid`)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    puzzle = verifier.Puzzle([int(v) for v in values], [str(s) for s in symbols], target=int(target))
    for _ in range(200):
        pattern = solver.PATTERNS[int(rng.integers(len(solver.PATTERNS)))]
        ops = solver.OP_TRIPLES[int(rng.integers(len(solver.OP_TRIPLES)))]
        formula = pattern.format(*[int(v) for v in values], o0=ops[0], o1=ops[1], o2=ops[2])
        text = format_answer(symbols, values, formula, target)
        if text not in avoid and verifier.score(text, puzzle).reward == -1:
            return text
    raise ValueError(f"no failed attempt found for {list(values)}")

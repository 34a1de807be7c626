"""Cards of GeneralPoints: ranks, suits, values under the two rules, seeded dealing of solvable hands.

A rank is an int 1..13 (A=1, J=11, Q=12, K=13). Its plain symbol is what prompts and answers use:
'A', '2'..'10', 'J', 'Q', 'K' (ten is written '10', never 'T'). Its value depends on the rule:
ID (`face_cards_as_10=True`) counts J/Q/K as 10, rule-OOD counts them as 11/12/13; A is always 1.

Dealing follows the reference code (SPEC §1.2): ID draws four ranks i.i.d. uniform on 1..13; OOD draws
three i.i.d. plus one face rank from {11, 12, 13} and shuffles the four; each suit is drawn
independently from the colour's suit set; a hand whose values cannot make the target is redrawn whole.
Unlike the reference (Python's global `random`, untouched by `reset(seed)`), dealing here draws from a
`numpy.random.Generator` that the env reseeds on `reset(seed=...)`, so a seed fixes the hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.general_points import solver

RANK_SYMBOLS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")  # index = rank - 1
FACE_RANKS = (11, 12, 13)
SUITS = ("H", "S", "D", "C")  # hearts, spades, diamonds, clubs
RED_SUITS = ("H", "D")
BLACK_SUITS = ("S", "C")
COLORS = {"mixed": SUITS, "black": BLACK_SUITS, "red": RED_SUITS}

# Accepted spellings in the `cards` option, upper-cased: the symbols plus 'T' and '1' for ten and ace.
_RANK_ALIASES = {s: r for r, s in enumerate(RANK_SYMBOLS, start=1)} | {"T": 10, "1": 1}


def symbol(rank: int) -> str:
    """Plain symbol of a rank: 1 -> 'A', 10 -> '10', 13 -> 'K'."""
    return RANK_SYMBOLS[rank - 1]


def value(rank: int, *, face_cards_as_10: bool, face_values: Sequence[int] | None = None) -> int:
    """Number a card counts as: J/Q/K are 10 under the ID rule and 11/12/13 under the OOD rule;
    `face_values` (J, Q, K), when given, is the rule instead (ours: rules other than the paper's two)."""
    if face_values is not None and rank > 10:
        return int(face_values[rank - 11])
    return min(rank, 10) if face_cards_as_10 else rank


@dataclasses.dataclass(frozen=True)
class Hand:
    """Four dealt cards, left to right. `ranks` 1..13, `suits` from 'H', 'S', 'D', 'C'."""

    ranks: tuple[int, ...]
    suits: tuple[str, ...]

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(symbol(r) for r in self.ranks)

    def values(self, *, face_cards_as_10: bool, face_values: Sequence[int] | None = None) -> tuple[int, ...]:
        return tuple(value(r, face_cards_as_10=face_cards_as_10, face_values=face_values) for r in self.ranks)

    @property
    def names(self) -> tuple[str, ...]:
        """Suit-first names as in the reference's image files: 'SA', 'H10', 'CK'."""
        return tuple(s + symbol(r) for r, s in zip(self.ranks, self.suits))


def suits_for(color: str) -> tuple[str, ...]:
    if color not in COLORS:
        raise EnvError(f"unknown color {color!r}; valid colors: {', '.join(COLORS)}")
    return COLORS[color]


def draw_ranks(rng: np.random.Generator, *, ood: bool) -> tuple[int, ...]:
    """One unconditioned draw of four ranks (no solvability check)."""
    if not ood:
        return tuple(int(r) for r in rng.integers(1, 14, size=4))
    ranks = [int(r) for r in rng.integers(1, 14, size=3)] + [int(rng.integers(11, 14))]
    return tuple(ranks[i] for i in rng.permutation(4))


def draw_suits(rng: np.random.Generator, suits: Sequence[str], n: int = 4) -> tuple[str, ...]:
    return tuple(suits[i] for i in rng.integers(0, len(suits), size=n))


def deal(
    rng: np.random.Generator,
    *,
    face_cards_as_10: bool = True,
    ood: bool = False,
    color: str = "mixed",
    target: int = 24,
    max_attempts: int = 10_000,
    face_values: Sequence[int] | None = None,
) -> Hand:
    """Deals a solvable hand: redraws ranks and suits together until the values can make `target`."""
    suits = suits_for(color)
    for _ in range(max_attempts):
        ranks = draw_ranks(rng, ood=ood)
        hand_suits = draw_suits(rng, suits)
        values = tuple(value(r, face_cards_as_10=face_cards_as_10, face_values=face_values) for r in ranks)
        if solver.is_solvable(values, target):
            return Hand(ranks, hand_suits)
    rule = "J/Q/K=10" if face_cards_as_10 else "J/Q/K=11/12/13"
    if face_values is not None:
        rule = "J/Q/K=" + "/".join(str(v) for v in face_values)
    raise EnvError(f"no solvable hand for target {target} ({rule}) in {max_attempts} draws; pick another target")


def _parse_rank(text: str) -> int | None:
    return _RANK_ALIASES.get(text.strip().upper())


def parse_card(item: Any, index: int) -> tuple[int, str | None]:
    """One element of the `cards` option -> (rank, suit or None). Raises EnvError naming the element."""
    if isinstance(item, bool):
        rank, suit = None, None
    elif isinstance(item, int | np.integer):
        rank, suit = (int(item), None) if 1 <= int(item) <= 13 else (None, None)
    elif isinstance(item, str):
        rank, suit = _parse_rank(item), None
        text = item.strip().upper()
        if rank is None and len(text) >= 2:
            if text[0] in SUITS and _parse_rank(text[1:]) is not None:  # suit first: "SK", "H10"
                rank, suit = _parse_rank(text[1:]), text[0]
            elif text[-1] in SUITS and _parse_rank(text[:-1]) is not None:  # rank first: "KS", "10H"
                rank, suit = _parse_rank(text[:-1]), text[-1]
    elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, str) for x in item):
        rank, suit = _parse_rank(item[0]), item[1].strip().upper()
        if suit not in SUITS:
            rank = None
    else:
        rank, suit = None, None
    if rank is None:
        raise EnvError(
            f"bad card {item!r} at position {index} of the 'cards' option; a card is a rank "
            f"({', '.join(RANK_SYMBOLS)}; also 'T' for ten, or an int 1..13) optionally with a suit "
            f"({', '.join(SUITS)}), e.g. 'K', 'KS', 'SK' or ('K', 'S')"
        )
    return rank, suit


def parse_cards(cards: Any, *, rng: np.random.Generator, color: str) -> Hand:
    """The `reset(options={"cards": [...]})` value -> Hand; cards without a suit get one from `color`."""
    if isinstance(cards, str) or not isinstance(cards, Sequence) or len(cards) != 4:
        raise EnvError(f"the 'cards' option must be a list of 4 cards, e.g. ['A', '3', 'K', '10'], got {cards!r}")
    parsed = [parse_card(item, i) for i, item in enumerate(cards)]
    drawn = draw_suits(rng, suits_for(color))
    return Hand(tuple(r for r, _ in parsed), tuple(s or d for (_, s), d in zip(parsed, drawn)))

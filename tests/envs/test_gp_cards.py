"""Dealing: distributions of the reference, solvable hands only, seeds, the `cards` option."""

from __future__ import annotations

import numpy as np
import pytest

from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.general_points import cards, solver


def test_symbols_and_values():
    assert [cards.symbol(r) for r in range(1, 14)] == ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
    assert [cards.value(r, face_cards_as_10=True) for r in (1, 10, 11, 12, 13)] == [1, 10, 10, 10, 10]
    assert [cards.value(r, face_cards_as_10=False) for r in (1, 10, 11, 12, 13)] == [1, 10, 11, 12, 13]
    hand = cards.Hand((1, 10, 13, 5), ("S", "H", "C", "D"))
    assert hand.symbols == ("A", "10", "K", "5") and hand.names == ("SA", "H10", "CK", "D5")


def test_id_deals_are_solvable_and_cover_all_ranks():
    rng = np.random.default_rng(0)
    ranks = []
    for _ in range(400):
        hand = cards.deal(rng)
        assert solver.is_solvable(hand.values(face_cards_as_10=True))
        assert set(hand.suits) <= set(cards.SUITS)
        ranks += hand.ranks
    assert set(ranks) == set(range(1, 14))


def test_ood_deals_have_a_face_card_and_values_above_10():
    for seed in range(300):
        hand = cards.deal(np.random.default_rng(seed), face_cards_as_10=False, ood=True)
        assert any(r in cards.FACE_RANKS for r in hand.ranks), hand
        values = hand.values(face_cards_as_10=False)
        assert max(values) >= 11 and solver.is_solvable(values)


def test_ood_face_card_position_is_shuffled():
    positions = set()
    for seed in range(200):
        hand = cards.deal(np.random.default_rng(seed), face_cards_as_10=False, ood=True)
        positions |= {i for i, r in enumerate(hand.ranks) if r >= 11}
    assert positions == {0, 1, 2, 3}


@pytest.mark.parametrize("color, suits", [("mixed", {"H", "S", "D", "C"}), ("black", {"S", "C"}), ("red", {"H", "D"})])
def test_suit_sets(color, suits):
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(100):
        seen |= set(cards.deal(rng, color=color).suits)
    assert seen == suits


def test_seeded_and_reproducible():
    a = [cards.deal(np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert cards.deal(np.random.default_rng(7)) != cards.deal(np.random.default_rng(8))


def test_rejection_rate_is_near_the_reference():
    rng = np.random.default_rng(2)
    draws = [cards.draw_ranks(rng, ood=False) for _ in range(3000)]
    rate = np.mean([solver.is_solvable([min(r, 10) for r in d]) for d in draws])
    assert 0.70 < rate < 0.76  # SPEC §1.2: about 73.1 %


def test_parse_cards():
    rng = np.random.default_rng(0)
    hand = cards.parse_cards(["A", "3", "K", "10"], rng=rng, color="black")
    assert hand.symbols == ("A", "3", "K", "10") and set(hand.suits) <= {"S", "C"}
    hand = cards.parse_cards(["KS", "h10", ("q", "D"), "t"], rng=rng, color="black")
    assert hand.ranks == (13, 10, 12, 10) and hand.suits[:3] == ("S", "H", "D")
    assert cards.parse_cards([1, 11, 12, 13], rng=rng, color="red").symbols == ("A", "J", "Q", "K")


@pytest.mark.parametrize(
    "bad, named",
    [
        (["A", "3", "K", "11"], "'11' at position 3"),
        (["A", "3", "K", "ZZ"], "'ZZ' at position 3"),
        (["A", "3", "KX", "2"], "'KX' at position 2"),
        (["A", "3", 0, "2"], "0 at position 2"),
        (["A", "3", True, "2"], "True at position 2"),
        (["A", "3", ("K", "X"), "2"], "('K', 'X') at position 2"),
        (["A", "3", "K"], "list of 4 cards"),
        ("A3K2", "list of 4 cards"),
    ],
)
def test_parse_cards_errors_name_the_element(bad, named):
    with pytest.raises(EnvError, match="must be a list of 4|bad card") as e:
        cards.parse_cards(bad, rng=np.random.default_rng(0), color="mixed")
    assert named in str(e.value)


def test_unknown_color():
    with pytest.raises(EnvError, match="unknown color 'blue'"):
        cards.deal(np.random.default_rng(0), color="blue")

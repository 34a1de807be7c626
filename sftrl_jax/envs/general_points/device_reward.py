"""GeneralPoints rewards jit-compiled over token ids, equal to `verifier.score` + the env's turn rules.

    fn = sftrl_jax.envs.device_reward_fn("gp-l", tokenizer)
    state = {k: np.stack([env.device_state()[k] for env in envs]) for k in ...}
    rewards, outcomes = fn.with_outcome(response_ids, lengths, state)   # or fn(...) -> rewards

Reading the answer as `answer.py` does, on the decoded text's bytes:
- JSON: when the text is whitespace, an object and whitespace, `device_json.scan` parses it (CPython's
  json grammar); a top-level "formula" key (the last one; keys decoded) gives the formula if its value
  is a string (else the formula is None: -3), decoded escapes included. An object that starts the text
  and nests deeper than `device_json.MAX_DEPTH` is left to the host (outcome JSON_TOO_DEEP): whether
  `json.loads` reads it depends on Python's recursion limit.
- Otherwise, or without the key: the regex `"formula": "(.*?)"`: the first `"formula": "` followed by
  a '"' before any '\\n'; none is the string "None" (-3).
- The formula is cut at its first '=', packed into code points and checked by `device_formula`.
- GP-VL first compares the cards (JSON "cards" list or string, else the regex `"cards": \\[([^\\]]+)\\]`)
  as multisets of symbols after the host's list cleaning: -1.5 on a mismatch.
The turn: a call with no graded attempt left is the step limit (-1, outcome STEP_LIMIT); the env's
`reward_floor` (None = off) bounds a graded turn's reward from below, its outcome unchanged.
Not on the device (`device_state` refuses them): `exact=False`, `reference_card_parsing=True`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sftrl_jax.envs import device_json as dj
from sftrl_jax.envs import device_text as dt
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.general_points import device_formula, verifier

MAX_SOLUTIONS = 640  # the most solution strings of a hand of 1..13 for target 24 is 521
SYMBOLS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
OUTCOMES = verifier.OUTCOMES  # outcome codes index this tuple (then JSON_TOO_DEEP, DID_NOT_FIT)
DEFAULT_BYTES_PER_TOKEN = dt.DEFAULT_BYTES_PER_TOKEN
_CODE = {name: i for i, name in enumerate((*OUTCOMES, dt.JSON_TOO_DEEP))}
_JSON_WS = (32, 9, 10, 13)
_CARD_DROP = tuple(map(ord, "[]' \""))


def puzzle_state(
    puzzle: verifier.Puzzle, *, remaining: int, check_cards: bool, reward_floor: float | None = None
) -> dict[str, np.ndarray]:
    """The arrays of one env's current turn (see `GeneralPointsEnv.device_state`)."""
    sols = puzzle.solutions
    if len(sols) > MAX_SOLUTIONS:
        raise EnvError(
            f"hand {list(puzzle.values)} has {len(sols)} solution strings, more than the device reward's "
            f"{MAX_SOLUTIONS}: set env.reward_on_device false"
        )
    table = np.full((MAX_SOLUTIONS, device_formula.SOLUTION_CHARS), -1, np.int8)
    lens = np.full((MAX_SOLUTIONS,), -1, np.int8)
    for i, s in enumerate(sols):
        table[i, : len(s)] = np.frombuffer(s.encode("ascii"), np.uint8)
        lens[i] = len(s)
    symbols = sorted(SYMBOLS.index(s) if s in SYMBOLS else -2 for s in puzzle.symbols)
    return {
        "values": np.array(puzzle.values, np.int32),
        "symbols": np.array(symbols, np.int32),  # sorted symbol codes
        "target": np.array(puzzle.target, np.int32),
        "solutions": table,
        "solution_len": lens,
        "remaining": np.array(remaining, np.int32),
        "check_cards": np.array(check_cards, bool),
        "reward_floor": np.array(-np.inf if reward_floor is None else reward_floor, np.float32),
    }


def _first(flag):
    return dt.first(flag)


def _span_mask(lo, hi, n):
    p = jnp.arange(n)[None]
    return (p >= lo[:, None]) & (p < hi[:, None])


def _items(kept, item, cp):
    """Symbol code [B, 4] of items 0..3 from the kept characters (position item index `item`)."""
    codes = []
    rank_all = jnp.cumsum(kept, axis=1) - 1
    base = jnp.zeros(kept.shape[0], jnp.int32)
    for j in range(4):
        mine = kept & (item == j)
        rank = rank_all - base[:, None]
        c0 = jnp.max(jnp.where(mine & (rank == 0), cp, -1), axis=1)
        c1 = jnp.max(jnp.where(mine & (rank == 1), cp, -1), axis=1)
        count = jnp.sum(mine, axis=1)
        base = base + count
        code = jnp.full_like(count, -1)
        for s, sym in enumerate(SYMBOLS):
            if len(sym) == 1:
                code = jnp.where((count == 1) & (c0 == ord(sym)), s, code)
            else:
                code = jnp.where((count == 2) & (c0 == ord(sym[0])) & (c1 == ord(sym[1])), s, code)
        codes.append(code)
    return jnp.stack(codes, axis=1)


def _clean_list(in_span, unit, cp):
    """`answer._clean_list(..., strip_double_quotes=True)` over the characters of a span."""
    chars = in_span & unit
    sep = chars & (cp == ord(","))
    drop = jnp.zeros_like(chars)
    for c in _CARD_DROP:
        drop |= cp == c
    item = jnp.cumsum(sep, axis=1)
    return jnp.sum(sep, axis=1) == 3, _items(chars & ~drop & ~sep, item, cp)


def _cards_match(b, ev, depth, unit, cp, su, scp, json_ok, cards, symbols):
    """GP-VL's recognition check: the answer's card list equals the dealt symbols as a multiset."""
    B, N = b.shape
    found, v, v_ev = cards
    use_json = json_ok & found
    # JSON string value
    close = dt.at(dt.next_index(ev == dj.EV_CLOSE_STR), v[:, None] + 1, N)[:, 0]
    ok_s, codes_s = _clean_list(_span_mask(v + 1, close, N), su, scp)
    # JSON list value: its elements are the depth-2 values up to its closing ']'
    is_list = (v_ev == dj.EV_OTHER_START) & (dt.at(b, v[:, None])[:, 0] == ord("["))
    end = dt.at(dt.next_index((ev == dj.EV_CLOSE) & (depth == 2)), v[:, None] + 1, N)[:, 0]
    inside = _span_mask(v + 1, end, N)
    starts = inside & (depth == 2) & ((ev == dj.EV_STR_OPEN) | (ev == dj.EV_NUM_START) | (ev == dj.EV_OTHER_START))
    elem = jnp.cumsum(starts, axis=1) - 1
    elem_ev = dt.at(ev, dt.prev_index(starts))
    in_str = inside & (depth == 2) & su & ((ev == dj.EV_CHAR) | (ev == dj.EV_ESC)) & (scp != ord(" "))
    in_num = inside & (depth == 2) & ((ev == dj.EV_NUM_START) | (ev == dj.EV_NUM)) & (elem_ev == dj.EV_NUM_START)
    kept_cp = jnp.where(in_num, b, scp)
    codes_l = _items(in_str | in_num, elem, kept_cp)
    other = starts & (ev == dj.EV_OTHER_START)
    other_elems = jnp.stack([jnp.any(other & (elem == j), axis=1) for j in range(4)], axis=1)
    codes_l = jnp.where(other_elems, -1, codes_l)
    ok_l = jnp.sum(starts, axis=1) == 4
    # the regex: the first '"cards": [' with a non-empty run of non-']' then ']'
    lit = dt.literal_at(b, '"cards": [')
    rb = dt.next_index(b == ord("]"))
    c = dt.positions(b) + 10
    close_r = dt.at(rb, c, N)
    p = _first(lit & (close_r < N) & (close_r > c))
    lo = p + 10
    hi = dt.at(rb, lo[:, None], N)[:, 0]
    ok_r, codes_r = _clean_list(_span_mask(lo, hi, N), unit, cp)
    ok_r &= p < N
    is_str = v_ev == dj.EV_STR_OPEN
    ok = jnp.where(use_json, jnp.where(is_str, ok_s, is_list & ok_l), ok_r)
    codes = jnp.where(use_json[:, None], jnp.where(is_str[:, None], codes_s, codes_l), codes_r)
    return ok & jnp.all(jnp.sort(codes, axis=1) == symbols, axis=1)


def score_bytes(b, state):
    """Rewards [B] float32 and outcome codes [B] int32 (indices into OUTCOMES, then
    `device_text.HOST_OUTCOMES`) of byte rows b [B, N] (END-padded). GP-L and GP-VL share the program:
    the state's `check_cards` (GP-VL) switches the recognition check on per row."""
    B, N = b.shape
    unit, cp = dt.utf8_units(b)
    ws = jnp.zeros(b.shape, bool)
    for c in _JSON_WS:
        ws |= b == c
    start = _first(~ws)
    start = jnp.where(dt.at(b, start[:, None], dt.END)[:, 0] == ord("{"), start, N)
    ev, depth, end = dj.scan(b, start)
    after = dt.positions(b) > end[:, None]
    json_ok = (end >= 0) & jnp.all(~after | ws | (b == dt.END), axis=1)
    su, scp = dj.string_units(b, ev, unit, cp)
    fields = dj.object_fields(ev, depth, su, scp, ("formula", "cards"))
    found, v, v_ev = fields["formula"]
    use_json = json_ok & found
    close = dt.at(dt.next_index(ev == dj.EV_CLOSE_STR), v[:, None] + 1, N)[:, 0]
    # regex: the first '"formula": "' followed by '"' before any newline
    lit = dt.literal_at(b, '"formula": "')
    q = dt.next_index(b == ord('"'))
    nl = dt.next_index(b == ord("\n"))
    c = dt.positions(b) + 12
    p = _first(lit & (dt.at(q, c, N) < dt.at(nl, c, N)))
    lo = jnp.where(use_json, v + 1, p + 12)
    hi = jnp.where(use_json, close, dt.at(q, (p + 12)[:, None], N)[:, 0])
    chars, cps = jnp.where(use_json[:, None], su, unit), jnp.where(use_json[:, None], scp, cp)
    in_span = _span_mask(lo, hi, N) & chars
    eq = _first(in_span & (cps == ord("=")))
    in_span &= dt.positions(b) < eq[:, None]
    F, n = dt.compact(in_span, cps, N)
    formula_none = jnp.where(use_json, v_ev != dj.EV_STR_OPEN, p >= N)  # None, or the missing "None"
    reward = device_formula.check(F, n, state["values"], state["target"], state["solutions"], state["solution_len"])
    reward = jnp.where(formula_none, verifier.REWARDS["ILLEGAL_FORMULA"], reward)
    seen = _cards_match(b, ev, depth, unit, cp, su, scp, json_ok, fields["cards"], state["symbols"])
    reward = jnp.where(seen | ~state["check_cards"], reward, verifier.REWARDS["INCORRECT_VISION"])
    code = jnp.full((B,), _CODE["AGGREGATED_ERROR"], jnp.int32)
    for name, r in verifier.REWARDS.items():
        code = jnp.where(reward == r, _CODE[name], code)
    reward = jnp.maximum(reward, state["reward_floor"])  # the env's reward_floor; the outcome stays unfloored
    limit = state["remaining"] <= 0
    reward = jnp.where(limit, verifier.STEP_LIMIT_REWARD, reward)
    code = jnp.where(limit, _CODE["STEP_LIMIT"], code)
    code = jnp.where(~limit & (end == dj.TOO_DEEP), _CODE[dt.JSON_TOO_DEEP], code)
    return reward.astype(jnp.float32), code

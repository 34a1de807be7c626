"""V-IRL rewards jit-compiled over token ids, equal to `verifier.verify` + the env's budget rule.

Reading the answer as `verifier.parse_answer` does, on the decoded text's bytes:
- JSON: the first of the text's first 16 '{' at which `raw_decode` gives an object with one of the
  three keys ("current observation", "current instruction", "action"; keys decoded, the last of
  duplicates winning); a field whose value is not a string is None. `json.loads` of the whole text,
  tried first on the host, is the same object as `raw_decode` at its first '{', so it needs no pass
  of its own. The passes run in a `while_loop` that stops once every row has its object or no '{'.
  A pass that meets nesting deeper than `device_json.MAX_DEPTH` before the row has its object leaves
  the row to the host (outcome JSON_TOO_DEEP): whether `raw_decode` reads it depends on Python's
  recursion limit.
- Otherwise per key the regex `"key"\\s*:\\s*"((?:[^"\\\\]|\\\\.)*)"` (`\\s` Unicode whitespace):
  the capture ends at the first unescaped '"' and fails at an escaped newline; it is JSON-decoded
  when that succeeds (no control characters, valid escapes), else kept raw.
The grade: +1 if the action equals the waypoint's expected action; else -1.5 if the observation's
"intersection" (ASCII case-insensitive: no other character lowercases into that word) disagrees with
the ground truth, else -1; a call with no attempt left is -1 "exceeded".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sftrl_jax.envs import device_json as dj
from sftrl_jax.envs import device_text as dt
from sftrl_jax.envs.virl import verifier

OUTCOMES = ("correct", "incorrect_action", "incorrect_observation", "exceeded")
MAX_ACTION_CHARS = 64
DEFAULT_BYTES_PER_TOKEN = dt.DEFAULT_BYTES_PER_TOKEN
MAX_JSON_STARTS = verifier._MAX_JSON_TRIES
_WORD = np.frombuffer(b"intersection", np.uint8).astype(np.int32)
_KEYS = ("action", "current observation")


def waypoint_state(*, gt_action: str, truth: str, tries_left: int) -> dict[str, np.ndarray]:
    """The arrays of one env's current turn (see `VirlEnv.device_state`)."""
    cps = [ord(c) for c in gt_action]
    if len(cps) > MAX_ACTION_CHARS:
        raise ValueError(f"expected action {gt_action!r} is longer than {MAX_ACTION_CHARS} characters")
    gt = np.full((MAX_ACTION_CHARS,), -1, np.int32)
    gt[: len(cps)] = cps
    return {
        "gt_action": gt,
        "gt_len": np.array(len(cps), np.int32),
        "is_at": np.array("intersection" in truth.lower(), bool),
        "tries_left": np.array(tries_left, np.int32),
    }


def _field_checks(in_span, unit, cp, state):
    """(the action equals the expected one, the observation says "intersection") over spans."""
    act_mask, obs_mask = in_span
    A, n = dt.compact(act_mask & unit, cp, MAX_ACTION_CHARS)
    eq = (n == state["gt_len"]) & jnp.all(A == state["gt_action"], axis=1)
    obs, _ = dt.compact(obs_mask & unit, cp, obs_mask.shape[1])
    obs = jnp.where((obs >= 65) & (obs <= 90), obs + 32, obs)
    hit = jnp.ones(obs.shape, bool)
    for k, ch in enumerate(_WORD):
        hit &= dt.shift(obs, k, -1) == ch
    return eq, jnp.any(hit, axis=1)


def _span(lo, hi, n):
    p = jnp.arange(n)[None]
    return (p >= lo[:, None]) & (p < hi[:, None])


def _json_pass(b, unit, cp, start, state):
    """One raw_decode pass from `start`: (has one of the keys, action equal, says intersection, nests
    deeper than the device reads)."""
    N = b.shape[1]
    ev, depth, end = dj.scan(b, start)
    su, scp = dj.string_units(b, ev, unit, cp)
    fields = dj.object_fields(ev, depth, su, scp, (*_KEYS, "current instruction"))
    has = (end >= 0) & (fields["action"][0] | fields["current observation"][0] | fields["current instruction"][0])
    closes = dt.next_index(ev == dj.EV_CLOSE_STR)
    spans = []
    for key in _KEYS:
        found, v, v_ev = fields[key]
        close = dt.at(closes, v[:, None] + 1, N)[:, 0]
        spans.append(_span(v + 1, close, N) & (found & (v_ev == dj.EV_STR_OPEN))[:, None])
    eq, says = _field_checks(spans, su, scp, state)
    return has, eq, says, end == dj.TOO_DEEP


def _regex_field(b, unit, cp, wsbyte, key):
    """The regex capture of one key: (span [B, N], JSON-decodable [B], fake events for decoding)."""
    N = b.shape[1]
    pos = dt.positions(b)
    lit = dt.literal_at(b, f'"{key}"')
    nonws = dt.next_index(~wsbyte)
    colon = dt.at(nonws, pos + len(key) + 2, N)
    quote = dt.at(nonws, colon + 1, N)
    ok = lit & (dt.at(b, colon, dt.END) == ord(":")) & (dt.at(b, quote, dt.END) == ord('"'))
    bs = b == ord("\\")
    run = pos - dt.prev_index(~bs)  # backslashes ending here (counting this one)
    esc = bs & (run % 2 == 1)
    escaped = dt.shift(esc, -1, False)
    end_at = dt.next_index((b == ord('"')) & ~escaped)
    bad_esc = dt.next_index(esc & (dt.shift(b, 1, dt.END) == ord("\n")))
    cs = quote + 1
    end = dt.at(end_at, cs, N)
    ok &= (end < N) & (dt.at(bad_esc, cs, N) >= end)
    p = dt.first(ok)
    lo = dt.at(cs, p[:, None], N)[:, 0]
    hi = dt.at(end, p[:, None], N)[:, 0]
    span = _span(lo, hi, N) & (p < N)[:, None]
    # JSON-decodable: no control character, every escape valid (\uXXXX: four hex digits in the span)
    kind = dt.shift(b, 1, dt.END)
    is_hex = jnp.zeros(b.shape, bool)
    for c in b"0123456789abcdefABCDEF":
        is_hex |= b == c
    hex4 = jnp.ones(b.shape, bool)
    for k in range(2, 6):
        hex4 &= dt.shift(is_hex, k, False) & (pos + k < hi[:, None])
    simple = jnp.zeros(b.shape, bool)
    for c in b'"\\/bfnrt':
        simple |= kind == c
    good = simple | ((kind == ord("u")) & hex4)
    decodable = ~jnp.any(span & (((b < 0x20) & (b >= 0)) | (esc & ~good)), axis=1)
    tail = dt.shift(esc, -1, False)
    u_tail = jnp.zeros(b.shape, bool)
    for k in range(2, 6):
        u_tail |= dt.shift(esc & (kind == ord("u")), -k, False)
    fake = jnp.where(esc, dj.EV_ESC, jnp.where(tail | u_tail, dj.EV_TAIL, dj.EV_CHAR))
    return span, decodable, jnp.where(span, fake, 0)


def score_bytes(b, state):
    """Rewards [B] float32 and outcome codes [B] int32 (indices into OUTCOMES, then
    `device_text.HOST_OUTCOMES`) of byte rows b [B, N] (END-padded)."""
    B, N = b.shape
    unit, cp = dt.utf8_units(b)
    braces, _ = dt.compact(b == ord("{"), dt.positions(b), MAX_JSON_STARTS, fill=N)

    def cond(carry):
        k, done = carry[0], carry[1]
        pending = ~done & (dt.at(braces, jnp.full((B, 1), k), N)[:, 0] < N)
        return (k < MAX_JSON_STARTS) & jnp.any(pending)

    def body(carry):
        k, done, eq, says, deep = carry
        start = jnp.where(done, N, braces[jnp.arange(B), k])
        has, eq_k, says_k, deep_k = _json_pass(b, unit, cp, start, state)
        deep = deep | (~done & deep_k)  # the host may read this pass's object: it decides the row
        new = ~done & (has | deep_k)
        return k + 1, done | new, jnp.where(new, eq_k, eq), jnp.where(new, says_k, says), deep

    false = jnp.zeros((B,), bool)
    _, from_json, eq_j, says_j, deep = jax.lax.while_loop(cond, body, (jnp.int32(0), false, false, false, false))
    # regex fallback
    ws_start = unit & dt.is_space(cp)
    wsbyte = ws_start | dt.shift(ws_start & (cp >= 0x80), -1, False) | dt.shift(ws_start & (cp >= 0x800), -2, False)
    spans, units, cps = [], [], []
    for key in _KEYS:
        span, decodable, fake = _regex_field(b, unit, cp, wsbyte, key)
        su, scp = dj.string_units(b, fake, unit, cp)
        spans.append(span)
        units.append(jnp.where(decodable[:, None], su, unit))
        cps.append(jnp.where(decodable[:, None], scp, cp))
    eq_a, _ = _field_checks((spans[0], jnp.zeros_like(spans[0])), units[0], cps[0], state)
    _, says_r = _field_checks((jnp.zeros_like(spans[1]), spans[1]), units[1], cps[1], state)
    eq = jnp.where(from_json, eq_j, eq_a)
    says = jnp.where(from_json, says_j, says_r)
    is_at = state["is_at"]
    reward = jnp.where(
        eq, verifier.CORRECT, jnp.where(says != is_at, verifier.INCORRECT_OBSERVATION, verifier.INCORRECT_ACTION)
    )
    code = jnp.where(eq, 0, jnp.where(says != is_at, 2, 1))
    exceeded = state["tries_left"] <= 0
    reward = jnp.where(exceeded, verifier.EXCEEDED, reward)
    code = jnp.where(exceeded, 3, code)
    code = jnp.where(~exceeded & deep, len(OUTCOMES), code)  # JSON_TOO_DEEP: the host's reward
    return reward.astype(jnp.float32), code.astype(jnp.int32)

"""Model text on the device: token ids -> bytes -> characters, for the jit-compiled rewards.

The host decodes a response with `tokenizer.decode(ids)` (special tokens skipped) and reads the text
with Python regexes and `json`. The device rewards read the same text as bytes: `ByteTable` maps a
token id to its bytes (built once from the tokenizer), `to_bytes` lays a batch of responses out as
[B, N] int32 byte rows padded with `END` (256), and `utf8_units` marks where each character starts
and its code point, with Python's `errors="replace"` reading of invalid UTF-8 (one U+FFFD per
maximal invalid subpart; the rewards only ever ask whether such a character is a digit, a given
ASCII character, or neither). The helpers are pure jnp functions over [B, N] arrays (B rows, N
bytes); positions are int32 and "none" is N.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import unicodedata
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sftrl_jax.errors import UserError

END = 256  # the byte value past the end of a row
REPLACEMENT = 0xFFFD
# Default byte budget per response token (cost grows with it; Llama 3 averages about 4 bytes per
# token). A response with more bytes is flagged DID_NOT_FIT, to be scored on the host.
DEFAULT_BYTES_PER_TOKEN = 6
DID_NOT_FIT = "DID_NOT_FIT"
# JSON nested deeper than `device_json.MAX_DEPTH`, where the host's reading hangs on Python's recursion
# limit: the device does not decide the reward, the host verifier does.
JSON_TOO_DEEP = "JSON_TOO_DEEP"
HOST_OUTCOMES = (JSON_TOO_DEEP, DID_NOT_FIT)  # outcomes whose reward is the host's, never the device's
# Every character Python's `\d` (and `int()`) reads as a decimal digit, Unicode category Nd.
_ND = np.array([c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Nd"], np.int32)
_ND_VALUE = np.array([unicodedata.digit(chr(c)) for c in _ND], np.int32)
# Two-level lookup (a gather per level instead of a binary search): 256-code-point block -> row of
# _ND_ROWS (0 = a block without digits) -> digit value or -1.
_ND_BLOCKS = np.unique(_ND >> 8)
_ND_BLOCK_ROW = np.zeros((sys.maxunicode >> 8) + 1, np.int32)
_ND_BLOCK_ROW[_ND_BLOCKS] = np.arange(1, len(_ND_BLOCKS) + 1)
_ND_ROWS = np.full((len(_ND_BLOCKS) + 1, 256), -1, np.int8)
_ND_ROWS[_ND_BLOCK_ROW[_ND >> 8], _ND & 0xFF] = _ND_VALUE


@dataclasses.dataclass(frozen=True, eq=False)
class ByteTable:
    """token id -> its bytes as the decoded text has them (special tokens: none)."""

    table: np.ndarray  # [V, K] int32, END past a token's length
    lengths: np.ndarray  # [V] int32

    @property
    def max_token_bytes(self) -> int:
        return int(self.table.shape[1])


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def byte_table(tokenizer) -> ByteTable:
    """The bytes of every token id of a byte-level BPE tokenizer (Llama 3's kind).

    `tokenizer` is `sftrl_jax.data.tokenizer.Tokenizer` or a HF tokenizer. Special tokens map to no
    bytes, as `decode(..., skip_special_tokens=True)` drops them; other added tokens to their text."""
    hf = getattr(tokenizer, "hf", tokenizer)
    decoder = json.loads(hf.backend_tokenizer.to_str()).get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise UserError(
            f"the device reward needs a byte-level BPE tokenizer (Llama 3's); this one's decoder is "
            f"{decoder.get('type')!r}: set env.reward_on_device false"
        )
    inverse = _byte_decoder()
    added = hf.added_tokens_decoder
    rows = []
    for i in range(len(hf)):
        if i in added:
            tok = added[i]
            rows.append(b"" if tok.special else tok.content.encode("utf-8"))
            continue
        piece = hf.convert_ids_to_tokens(i)
        rows.append(bytes(inverse[c] for c in piece) if piece is not None else b"")
    k = max(1, max(len(r) for r in rows))
    table = np.full((len(rows), k), END, np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = list(r)
    return ByteTable(table, np.array([len(r) for r in rows], np.int32))


def to_bytes(table: ByteTable, ids: jax.Array, lengths: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Responses [B, L] (the first `lengths` ids count) -> bytes [B, n] (END-padded), byte counts [B].

    A count above `n` means the row did not fit (its first n bytes are kept)."""
    B, L = ids.shape
    ids = jnp.clip(ids, 0, table.table.shape[0] - 1)
    tok_len = jnp.where(jnp.arange(L)[None] < lengths[:, None], jnp.asarray(table.lengths)[ids], 0)  # [B, L]
    offset = jnp.cumsum(tok_len, axis=1) - tok_len
    k = jnp.arange(table.max_token_bytes)
    where = jnp.where(k[None, None] < tok_len[..., None], offset[..., None] + k[None, None], n)  # [B, L, K]
    values = jnp.asarray(table.table)[ids]  # [B, L, K]
    rows = jnp.arange(B)[:, None, None]
    out = jnp.full((B, n), END, jnp.int32).at[rows, where].set(values, mode="drop")
    return out, tok_len.sum(axis=1)


# ------------------------------------------------------------------------------------------ positions


def shift(x: jax.Array, k: int, fill) -> jax.Array:
    """x[:, p + k] at p (fill past either end)."""
    n = x.shape[1]
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], abs(k)), fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], 1) if k > 0 else jnp.concatenate([pad, x[:, : n + k]], 1)


def positions(x: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)


def next_index(flag: jax.Array) -> jax.Array:
    """[B, N] -> the first q >= p with flag[q] (N if none)."""
    n = flag.shape[1]
    return jax.lax.cummin(jnp.where(flag, positions(flag), n), axis=1, reverse=True)


def prev_index(flag: jax.Array) -> jax.Array:
    """[B, N] -> the last q <= p with flag[q] (-1 if none)."""
    return jax.lax.cummax(jnp.where(flag, positions(flag), -1), axis=1)


def at(x: jax.Array, idx: jax.Array, fill=0) -> jax.Array:
    """x[b, idx[b, ...]] with `fill` where idx is outside 0..N-1."""
    n = x.shape[1]
    flat = idx.reshape(idx.shape[0], -1)
    got = jnp.take_along_axis(x, jnp.clip(flat, 0, n - 1), axis=1)
    got = jnp.where((flat >= 0) & (flat < n), got, jnp.asarray(fill, x.dtype))
    return got.reshape(idx.shape)


def first(flag: jax.Array) -> jax.Array:
    """[B, N] -> first index with flag (N if none)."""
    return jnp.min(jnp.where(flag, positions(flag), flag.shape[1]), axis=1)


def last(flag: jax.Array) -> jax.Array:
    """[B, N] -> last index with flag (-1 if none)."""
    return jnp.max(jnp.where(flag, positions(flag), -1), axis=1)


def literal_at(b: jax.Array, text: str) -> jax.Array:
    """[B, N] bool: the ASCII literal `text` starts at p."""
    hit = jnp.ones(b.shape, bool)
    for k, ch in enumerate(text.encode("ascii")):
        hit &= shift(b, k, END) == ch
    return hit


def compact(mask: jax.Array, values: jax.Array, m: int, fill: int = -1) -> tuple[jax.Array, jax.Array]:
    """The values where mask holds, in order, packed into [B, m] (fill after), and their counts [B]."""
    rank = jnp.cumsum(mask, axis=1) - 1
    idx = jnp.where(mask, rank, m)
    rows = jnp.arange(mask.shape[0])[:, None]
    out = jnp.full((mask.shape[0], m), fill, values.dtype).at[rows, idx].set(values, mode="drop")
    return out, mask.sum(axis=1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- UTF-8


def _in(x, lo, hi):
    return (x >= lo) & (x <= hi)


def utf8_units(b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, N] bytes -> (a character starts here [B, N] bool, its code point [B, N] int32).

    Python's `bytes.decode("utf-8", "replace")` and the tokenizer's lossy decoding: a valid sequence is
    one character; a lead byte with a valid but cut-short tail, and any other stray byte, is one
    U+FFFD."""
    b1, b2, b3 = shift(b, 1, END), shift(b, 2, END), shift(b, 3, END)
    c1, c2, c3 = _in(b1, 0x80, 0xBF), _in(b2, 0x80, 0xBF), _in(b3, 0x80, 0xBF)
    two = _in(b, 0xC2, 0xDF)
    three = _in(b, 0xE0, 0xEF)
    four = _in(b, 0xF0, 0xF4)
    lo3 = jnp.where(b == 0xE0, 0xA0, 0x80)
    hi3 = jnp.where(b == 0xED, 0x9F, 0xBF)
    lo4 = jnp.where(b == 0xF0, 0x90, 0x80)
    hi4 = jnp.where(b == 0xF4, 0x8F, 0xBF)
    ok1_3 = three & (b1 >= lo3) & (b1 <= hi3)
    ok1_4 = four & (b1 >= lo4) & (b1 <= hi4)
    span = jnp.ones_like(b)
    span = jnp.where(two & c1, 2, span)
    span = jnp.where(ok1_3, jnp.where(c2, 3, 2), span)
    span = jnp.where(ok1_4, jnp.where(c2, jnp.where(c3, 4, 3), 2), span)
    complete = (two & c1) | (ok1_3 & c2) | (ok1_4 & c2 & c3)
    covered = (shift(span, -1, 1) >= 2) | (shift(span, -2, 1) >= 3) | (shift(span, -3, 1) >= 4)
    is_unit = (b != END) & ~covered
    cp2 = ((b & 0x1F) << 6) | (b1 & 0x3F)
    cp3 = ((b & 0x0F) << 12) | ((b1 & 0x3F) << 6) | (b2 & 0x3F)
    cp4 = ((b & 0x07) << 18) | ((b1 & 0x3F) << 12) | ((b2 & 0x3F) << 6) | (b3 & 0x3F)
    cp = jnp.where(b < 0x80, b, REPLACEMENT)
    cp = jnp.where(complete & two, cp2, cp)
    cp = jnp.where(complete & three, cp3, cp)
    cp = jnp.where(complete & four, cp4, cp)
    return is_unit, cp


def digit_value(cp: jax.Array) -> jax.Array:
    """The decimal value of a code point that Python's `\\d` matches (Unicode Nd), else -1."""
    ok = (cp >= 0) & (cp <= sys.maxunicode)
    c = jnp.where(ok, cp, 0)
    row = jnp.asarray(_ND_BLOCK_ROW)[c >> 8]
    value = jnp.asarray(_ND_ROWS.reshape(-1))[row * 256 + (c & 0xFF)].astype(jnp.int32)
    return jnp.where(ok, value, -1)


_WS_EXTRA = (0x1C, 0x1D, 0x1E, 0x1F, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F)


def is_space(cp: jax.Array) -> jax.Array:
    """What Python's `\\s` matches in a str pattern (str.isspace)."""
    out = _in(cp, 0x09, 0x0D) | (cp == 0x20) | (cp == 0x3000)
    for c in _WS_EXTRA:
        out |= cp == c
    return out


assert all(chr(c).isspace() for c in _WS_EXTRA)
assert sum(chr(c).isspace() for c in range(sys.maxunicode + 1)) == len(_WS_EXTRA) + 7


@dataclasses.dataclass(frozen=True, eq=False)
class ByteReward:
    """A task's device reward: response ids -> bytes through the tokenizer's table (at most
    `max_bytes`, default DEFAULT_BYTES_PER_TOKEN per token), then the task's
    `score_bytes(b, state) -> (rewards [B] float32, outcome codes [B] int32)` of byte rows b [B, N].
    `outcomes` names the codes: the task's `task_outcomes`, then HOST_OUTCOMES. A response longer than
    `max_bytes` gets DID_NOT_FIT (the last); rows with an outcome in HOST_OUTCOMES are undecided: their
    reward is not the host's, score them there."""

    table: ByteTable
    score_bytes: Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]
    task_outcomes: tuple[str, ...]
    max_bytes: int | None = None

    @property
    def outcomes(self) -> tuple[str, ...]:
        return (*self.task_outcomes, *HOST_OUTCOMES)

    def __call__(self, response_ids, lengths, state):
        return self.with_outcome(response_ids, lengths, state)[0]

    def with_outcome(self, response_ids, lengths, state):
        L = response_ids.shape[1]
        N = self.max_bytes or L * min(self.table.max_token_bytes, DEFAULT_BYTES_PER_TOKEN)
        b, count = to_bytes(self.table, jnp.asarray(response_ids, jnp.int32), jnp.asarray(lengths, jnp.int32), N)
        reward, code = self.score_bytes(b, state)
        return reward, jnp.where(count > N, len(self.outcomes) - 1, code)

"""Plain XLA implementations of the seam's ops: the reference every backend falls back to.

These are what a GPU or TPU runs when no fused kernel applies, and what the parity tests force on
CPU (`ops.Policy(reference=True)`), so "the XLA path of each backend" is this one file.

Shape legend: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def dense(x: jax.Array, w: jax.Array, *, n_in: int = 1, out_dtype=None) -> jax.Array:
    """Contract the last `n_in` axes of x with the first `n_in` of w: [..., *in] x [*in, *out] -> [..., *out].
    One `dot_general` over the original axes (no reshape), so sharded axes stay as they are."""
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, scale: float) -> jax.Array:
    """Softmax attention with grouped kv heads over every key; scores and softmax in fp32.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] bool (True = attend) or None -> [B, T, N, H].
    A row with nothing to attend gets uniform weights over all S keys (as transformers' additive
    finfo.min mask does)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    q = q.reshape(b, t, kv_heads, g, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE of x [B, T, N, H] with tables cos, sin [B, T, H/2] (fp32): rotate the halves of H."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


DECODE_BLOCK = 128  # cache slots per block of `attention_filled`


def attention_filled(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    filled: jax.Array,
    *,
    scale: float,
    block: int = DECODE_BLOCK,
) -> jax.Array:
    """`attention` over the first `filled` key slots only (a KV cache whose slots from `filled` on are
    empty), reading ceil(filled / block) blocks of keys and values instead of all S: a loop over the
    filled blocks with an online softmax (running max, sum and weighted values in fp32, as flash
    decoding). q [B, T, N, H] (a decode step: T = 1), k/v [B, S, K, H], mask [B, T, S], `filled` an
    int32 scalar (traced), 1 <= filled <= S. Slots at or after `filled` are never attended, whatever
    the mask says. A row with no key to attend gets the reference's uniform weights over all S slots,
    whose empty ones hold zeros: sum(v) / S."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    block = min(block, s)
    qr = q.reshape(b, t, kv_heads, g, h)
    if mask is None:
        mask = jnp.ones((b, t, s), bool)
    neg = jnp.finfo(jnp.float32).min
    filled = jnp.asarray(filled, jnp.int32)

    def body(i, carry):
        m, total, acc, vsum = carry
        start = i * block
        at = jnp.minimum(start, s - block)  # the last block is clamped to the cache's end ...
        kb = jax.lax.dynamic_slice_in_dim(k, at, block, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(v, at, block, axis=1)
        mb = jax.lax.dynamic_slice_in_dim(mask, at, block, axis=2)  # [B, T, Bk]
        slot = at + jnp.arange(block)
        fresh = (slot >= start) & (slot < filled)  # ... so slots an earlier block read are skipped
        keep = mb & fresh  # [B, T, Bk]
        sc = jnp.einsum("BTKGH,BSKH->BKGTS", qr, kb, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(keep[:, None, None], sc, neg)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        p = jnp.where(keep[:, None, None], jnp.exp(sc - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        total = total * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum(
            "BKGTS,BSKH->BKGTH", p.astype(v.dtype), vb, preferred_element_type=jnp.float32
        )
        vsum = vsum + jnp.sum(jnp.where(fresh[None, :, None, None], vb.astype(jnp.float32), 0.0), axis=1)
        return m_new, total, acc, vsum

    init = (
        jnp.full((b, kv_heads, g, t), neg, jnp.float32),
        jnp.zeros((b, kv_heads, g, t), jnp.float32),
        jnp.zeros((b, kv_heads, g, t, h), jnp.float32),
        jnp.zeros((b, kv_heads, h), jnp.float32),
    )
    n_blocks = (filled + block - 1) // block
    _, total, acc, vsum = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.maximum(total, 1e-30)[..., None]  # [B, K, G, T, H]
    uniform = jnp.broadcast_to((vsum / s)[:, :, None, None, :], out.shape)
    out = jnp.where((total > 0)[..., None], out, uniform)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(v.dtype)


BLOCK = 512  # query rows per block of `attention_blocked`


def attention_blocked(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, scale: float, block: int = BLOCK
) -> jax.Array:
    """`attention` in blocks of `block` query rows, forward and backward, in XLA ops: the memory shape
    of a fused (flash) kernel. The forward keeps each row's output and log-sum-exp, not its
    probabilities; the backward recomputes a block's probabilities from them (one more score product
    per block). [B, N, block, S] fp32 scores at a time instead of [B, N, T, S]: what `sftrl plan`
    compiles in place of cuDNN's / the TPU's fused kernels, which XLA:CPU cannot run. Equal to
    `attention` (same fp32 softmax, rows with nothing to attend uniform). The block is the largest
    divisor of T from `block` down to `block / 4` (a vision tile's 1608 patches: 402); T <= block, or
    no such divisor, runs `attention` itself."""
    t = q.shape[1]
    block = next((c for c in range(min(block, t), block // 4 - 1, -1) if t % c == 0), t)
    if block >= t:
        return attention(q, k, v, mask, scale=scale)
    if mask is None:
        mask = jnp.ones((q.shape[0], t, k.shape[1]), bool)
    return _blocked(q, k, v, mask, float(scale), int(block))


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, T, ...] -> [T / block, B, block, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _block_scores(qb, k, mb, scale):
    """A block's fp32 scores minus each row's max, masked as `attention` masks them: [B, K, G, block, S]
    (a row with nothing to attend: all 0, so uniform), and the rows' maxima."""
    b, c, n, h = qb.shape
    kv_heads = k.shape[2]
    qr = qb.reshape(b, c, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qr, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mb[:, None, None], scores, jnp.finfo(jnp.float32).min)
    m = jnp.max(scores, axis=-1, keepdims=True)
    return scores - m, m[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked(q, k, v, mask, scale, block):
    return _blocked_fwd(q, k, v, mask, scale, block)[0]


def _blocked_fwd(q, k, v, mask, scale, block):
    b, t, n, h = q.shape

    def one(_, xs):
        qb, mb = xs
        shifted, _ = _block_scores(qb, k, mb, scale)
        e = jnp.exp(shifted)
        log_sum = jnp.log(jnp.sum(e, axis=-1))  # per row, of the max-shifted scores
        probs = (e / jnp.exp(log_sum)[..., None]).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(qb.shape)
        return None, (out, log_sum)

    _, (out, lse) = jax.lax.scan(one, None, (_blocks(q, block), _blocks(mask, block)))
    out = _unblocks(out)
    return out, (q, k, v, mask, out, lse)


def _blocked_bwd(scale, block, res, g):
    q, k, v, mask, out, lse = res
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    groups = n // kv_heads

    def one(carry, xs):
        dk, dv = carry
        qb, mb, ob, gb, lb = xs
        shifted, _ = _block_scores(qb, k, mb, scale)
        probs = jnp.exp(shifted - lb[..., None])  # [B, K, G, c, S], recomputed
        c = qb.shape[1]
        g5 = gb.reshape(b, c, kv_heads, groups, h).astype(jnp.float32)
        dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", probs.astype(v.dtype).astype(jnp.float32), g5)
        dp = jnp.einsum("BTKGH,BSKH->BKGTS", g5, v.astype(jnp.float32))
        row = jnp.einsum("BTKGH,BTKGH->BKGT", g5, ob.reshape(b, c, kv_heads, groups, h).astype(jnp.float32))
        ds = jnp.where(mb[:, None, None], probs * (dp - row[..., None]), 0.0) * scale  # masked: no gradient
        dq = jnp.einsum("BKGTS,BSKH->BTKGH", ds, k.astype(jnp.float32)).reshape(qb.shape)
        dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", ds, qb.reshape(b, c, kv_heads, groups, h).astype(jnp.float32))
        return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    xs = tuple(_blocks(x, block) for x in (q, mask, out, g)) + (lse,)  # lse: per block already
    (dk, dv), dq = jax.lax.scan(one, zeros, xs)
    return _unblocks(dq), dk.astype(k.dtype), dv.astype(v.dtype), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)

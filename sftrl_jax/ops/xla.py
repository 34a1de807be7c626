"""Plain XLA implementations of the seam's ops: the reference every backend falls back to.

These are what a GPU or TPU runs when no fused kernel applies, and what the parity tests force on
CPU (`ops.Policy(reference=True)`), so "the XLA path of each backend" is this one file.

Shape legend: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

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

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

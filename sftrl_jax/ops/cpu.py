"""The CPU backend of the seam: XLA ops laid out for XLA:CPU, plus the native kernels of
`sftrl_jax.kernels` where they pay for themselves (the only importer of that package).

What runs, and the measured reason it is kept (2-core CPU of our build machines, fp32):
- `dense` without kernels: one 2-D matmul with a hand-written backward. Autodiff of an einsum gives
  the weight gradient as a dot contracting x's leading axis, which XLA:CPU cannot give to its
  YNNPACK matmul and runs ~2x slower; here dW = x^T @ g is a row-major matmul on x^T behind an
  optimisation barrier.
- `Policy.cpu_kernels` (one CPU device, kernels built): fp32 products forward and backward on
  OpenBLAS (`kernels.gemm`: 10-15% faster SFT steps, `tools/bench_gemm.py`), q|k|v and gate|up
  as one product each and RoPE as `kernels.rope` (together ~4% of an SFT step; XLA:CPU evaluated
  the RoPE trigonometry per head and half: 4.4 -> 0.25 ms for q at 8 x 256 x 8 x 64), causal
  self-attention as `kernels.causal_attention` (flash-style; a 2 x 1024-token step of the
  benchmark model ~10% faster than the same blocks as XLA ops). `Policy.exact` keeps only the
  products (the RL passes: ratio exactly 1 on the first update).
- causal attention without kernels: the queries in blocks of `causal_block(T)` rows against the
  keys up to each block's end (one layer's forward and backward: T 1024 158.6 -> 88.1 ms,
  T 2048 353.2 -> 192.9 ms).
docs/BENCHMARKS.md holds the measurements with their commands.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sftrl_jax import kernels
from sftrl_jax.ops import policy as policy_lib
from sftrl_jax.ops import xla

# On CPU the decode loop hands only matmuls to XLA's YNNPACK library: its elementwise and reduction
# kernels cost ~0.1 ms each for the decode's tiny arrays (thread hand-offs), XLA's own loops far less.
DECODE_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
# Without YNNPACK fusions: XLA:CPU chose them per program, so the RL update step rounded its first
# forward differently from the values pass (first |ratio - 1| 4.0e-5 -> exactly 0).
EXACT_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _gemm(x: jax.Array, w: jax.Array, out_dtype=None) -> bool:
    if not policy_lib.current().cpu_kernels or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return False
    if out_dtype is not None and jnp.dtype(out_dtype) != jnp.float32:
        return False
    return kernels.gemm_available()


def _fused_kernels() -> bool:
    p = policy_lib.current()
    return p.cpu_kernels and not p.exact


def dense(x: jax.Array, w: jax.Array, *, n_in: int = 1, out_dtype=None) -> jax.Array:
    lead, out = x.shape[: x.ndim - n_in], w.shape[n_in:]
    k = int(np.prod(w.shape[:n_in]))
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    y = _blas_bmm(x2, w2, False, False) if _gemm(x, w, out_dtype) else _matmul(x2, w2, out_dtype)
    return y.reshape(*lead, *out)


def dense_fused(x: jax.Array, ws: Sequence[jax.Array]) -> list[jax.Array]:
    """One OpenBLAS product against the weights concatenated along their outputs when the fused
    kernels may run (at batch 8 x 256 tokens and D 512 the k and v products run at ~130 GF/s, the
    fused q|k|v at ~150; one layer's q/k/v forward and backward 51 -> 45 ms); separate otherwise."""
    if len(ws) < 2 or not _fused_kernels() or not all(_gemm(x, w) for w in ws):
        return [dense(x, w) for w in ws]
    d = x.shape[-1]
    flat = [w.reshape(d, -1) for w in ws]
    y = _blas_bmm(x.reshape(-1, d), jnp.concatenate(flat, axis=1), False, False)
    cuts = np.cumsum([w.shape[1] for w in flat])[:-1]
    lead = x.shape[:-1]
    return [part.reshape(*lead, *w.shape[1:]) for part, w in zip(jnp.split(y, cuts, axis=1), ws, strict=True)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def _matmul_fwd(x, w, out_dtype):
    return _matmul(x, w, out_dtype), (x, w)


def _matmul_bwd(out_dtype, res, g):
    x, w = res
    dx = jnp.matmul(g.astype(x.dtype), w.T, preferred_element_type=x.dtype)
    x_t = jax.lax.optimization_barrier(x.T)
    dw = jnp.matmul(x_t, g.astype(w.dtype), preferred_element_type=w.dtype)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _blas_bmm(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    """op(a) @ op(b) (over any leading batch axes) as `kernels.gemm` calls, the backward pass too
    (each gradient is one more product with transposes read in place: no transpose copies)."""
    return kernels.gemm(a, b, trans_a=trans_a, trans_b=trans_b)


def _blas_bmm_fwd(a, b, trans_a, trans_b):
    return _blas_bmm(a, b, trans_a, trans_b), (a, b)


def _blas_bmm_bwd(trans_a, trans_b, res, g):
    a, b = res
    # c = op(a) op(b): d op(a) = g op(b)^T, d op(b) = op(a)^T g, each laid out like a and b.
    if trans_a:
        da = kernels.gemm(b, g, trans_a=trans_b, trans_b=True)
    else:
        da = kernels.gemm(g, b, trans_b=not trans_b)
    if trans_b:
        db = kernels.gemm(g, a, trans_a=True, trans_b=trans_a)
    else:
        db = kernels.gemm(a, g, trans_a=not trans_a)
    return da, db


_blas_bmm.defvjp(_blas_bmm_fwd, _blas_bmm_bwd)


# --------------------------------------------------------------------------------------------------
# RoPE


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    if x.dtype == jnp.float32 and _fused_kernels() and kernels.available():
        return _rope_kernel(x, cos.astype(jnp.float32), sin.astype(jnp.float32))
    return xla.rope(x, cos, sin)


@jax.custom_vjp
def _rope_kernel(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    return kernels.rope(x, cos, sin)


def _rope_kernel_fwd(x, cos, sin):
    return _rope_kernel(x, cos, sin), (cos, sin)


def _rope_kernel_bwd(res, g):
    cos, sin = res
    # The tables come from integer positions: no gradient flows into them.
    return kernels.rope(g, cos, sin, inverse=True), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope_kernel.defvjp(_rope_kernel_fwd, _rope_kernel_bwd)


# --------------------------------------------------------------------------------------------------
# Attention


def causal_block(t: int) -> int:
    """Query rows per block of causal attention for T = t: 64, and 128 from 1024 on (one layer's
    attention, forward and backward: T 1024 158.6 ms unblocked, 95.3 ms in blocks of 64, 88.1 in
    blocks of 128; T 2048 353.2, 192.9 in 128, 198.4 in 256)."""
    return 64 if t < 1024 else 128


def attention(q, k, v, mask, *, scale: float, causal: bool = False) -> jax.Array:
    forced = policy_lib.current().attention
    b, t = q.shape[:2]
    if causal and mask is None:
        mask = jnp.broadcast_to(jnp.tri(t, dtype=bool), (b, t, t))
    self_attn = causal and k.shape[1] == t
    if self_attn and forced in (None, "cpu_kernel") and _fused_kernels() and _gemm(q, k) and v.dtype == jnp.float32:
        return _causal_kernel(q, k, v, mask, float(scale))
    if t == 1:
        return _attend_one(q, k, v, mask, scale)
    if not self_attn or causal_block(t) >= t:
        return _attention(q, k, v, mask, scale)
    c = causal_block(t)
    blocks = []
    for start in range(0, t, c):
        end = min(start + c, t)
        blocks.append(_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end], scale))
    out = jnp.concatenate(blocks, axis=1)
    # A row with no key at all attends uniformly to all S keys, not only to its block's prefix.
    g = q.shape[2] // k.shape[2]
    uniform = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), g, axis=1).astype(out.dtype)  # [B, N, H]
    return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, uniform[:, None])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_kernel(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Causal self-attention as `kernels.causal_attention`, forward and backward (one call each per
    layer, on the model's own [B, T, heads, H] layout; the backward recomputes the probabilities
    from the rows' log-sum-exp instead of keeping [B, N, T, T] of them)."""
    return _causal_kernel_fwd(q, k, v, mask, scale)[0]


def _causal_kernel_fwd(q, k, v, mask, scale):
    out, lse = kernels.causal_attention(q, k, v, mask, scale=scale, block=causal_block(q.shape[1]))
    return out, (q, k, v, mask, out, lse)


def _causal_kernel_bwd(scale, res, g):
    q, k, v, mask, out, lse = res
    dq, dk, dv = kernels.causal_attention_grad(q, k, v, mask, out, lse, g, scale=scale, block=causal_block(q.shape[1]))
    return dq, dk, dv, None


_causal_kernel.defvjp(_causal_kernel_fwd, _causal_kernel_bwd)


def _attend_one(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """One query per row (a decode step) against the cache in its own [B, S, K, H] layout: no
    transpose of the cache (which `_attention`'s layout would copy per layer and step); the softmax
    normalised after the value product."""
    b, _, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, kv_heads, n // kv_heads, h)  # [B, K, G, H]
    scores = jnp.einsum("BKGH,BSKH->BKGS", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, :, None, :], scores, jnp.finfo(jnp.float32).min)  # [B, 1, 1, S] over K, G
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.einsum("BKGS,BSKH->BKGH", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype).reshape(b, 1, n, h)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """`xla.attention` laid out for XLA:CPU: batch dims (B, K) first and the G query heads of a kv
    head folded into the query axis, so XLA emits plain batched matmuls (about 3x faster on CPU
    than the 5-d einsum with batch dims inside); with the kernels the products run on OpenBLAS."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)  # [B, K, G*T, H]
    k = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    v = v.transpose(0, 2, 1, 3)
    blas = _gemm(q, k) and v.dtype == jnp.float32
    if blas:
        scores = _blas_bmm(q, k, False, True) * scale
    else:
        scores = jnp.einsum("BKQH,BKSH->BKQS", q, k, preferred_element_type=jnp.float32) * scale  # Q = G*T
    if mask is not None:
        m = jnp.broadcast_to(mask[:, None, None, :, :], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
        scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = _blas_bmm(probs, v, False, False) if blas else jnp.einsum("BKQS,BKSH->BKQH", probs, v)  # [B, K, G*T, H]
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def peak_products():
    """Jitted fp32 products [n, n] x [n, n] this backend's steps may use (MFU's denominator takes
    the best): XLA's dot and, with the OpenBLAS kernel built, `kernels.gemm`."""
    products = [jax.jit(lambda x: x @ x)]
    if kernels.gemm_available():
        products.append(jax.jit(lambda x: kernels.gemm(x, x)))
    return products

"""The ops seam: the only place that knows which implementation of a model op runs where.

Model code (`models/`) calls these and nothing backend-specific:

    ops.dense(x, w, n_in=1, out_dtype=None)      # [..., *in] x [*in, *out] -> [..., *out]
    ops.dense_fused(x, [w_q, w_k, w_v])           # [dense(x, w) for w in ws], maybe as one product
    ops.rope(x, cos, sin)                         # x [B, T, N, H], tables [B, T, H/2]
    ops.rope_cos_sin(positions, inv_freq)         # the tables, once per forward
    ops.attention(q, k, v, mask, scale=.., causal=..)   # q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S]
    ops.attention(q, k, v, mask, scale=.., filled=n)    # a decode step: only the cache's first n slots

Which one runs is decided per backend in one module each, the way MaxText's attention op picks its
kernel: `ops.gpu` (cuDNN fused attention through `jax.nn.dot_product_attention`), `ops.tpu`
(Pallas flash attention), `ops.cpu` (XLA laid out for XLA:CPU, plus the native kernels of
`sftrl_jax.kernels` on one CPU device, each with its measured gain), `ops.xla` (the plain XLA
reference every backend falls back to). What a traced program may use is an `ops.Policy`
(`policy_for(mesh)`, `traced_with(step, policy)`); outside any policy the platform default runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sftrl_jax.ops import cpu, gpu, tpu, xla
from sftrl_jax.ops.policy import ATTENTION_IMPLS, Policy, current, policy_for, traced_with, use

__all__ = [
    "ATTENTION_IMPLS",
    "Policy",
    "attention",
    "current",
    "decode_compiler_options",
    "dense",
    "dense_fused",
    "exact_compiler_options",
    "peak_products",
    "policy_for",
    "rope",
    "rope_cos_sin",
    "traced_with",
    "use",
]


def _backend() -> str:
    return current().backend


def dense(x: jax.Array, w: jax.Array, *, n_in: int = 1, out_dtype=None) -> jax.Array:
    """Contract the last `n_in` axes of x with the first `n_in` axes of w: [..., *in] x [*in, *out] ->
    [..., *out], the value of the equivalent `jnp.einsum`; `out_dtype`: the product's result type
    (e.g. fp32 logits from bf16 inputs)."""
    if _backend() == "cpu" and not current().reference:
        return cpu.dense(x, w, n_in=n_in, out_dtype=out_dtype)
    return xla.dense(x, w, n_in=n_in, out_dtype=out_dtype)


def dense_fused(x: jax.Array, ws: Sequence[jax.Array]) -> list[jax.Array]:
    """`[dense(x, w) for w in ws]` for weights [D, *out_i] sharing the input (q/k/v, gate/up): one
    product where that is faster (the CPU kernels), separate products elsewhere, so no
    concatenation ever crosses a sharded axis."""
    if _backend() == "cpu" and not current().reference:
        return cpu.dense_fused(x, ws)
    return [xla.dense(x, w) for w in ws]


def rope_cos_sin(positions: jax.Array, inv_freq) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, H/2] (fp32) of the RoPE angles positions [B, T] x inv_freq [H/2], computed
    once per forward and shared by every layer's q and k."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
    return jnp.cos(angles), jnp.sin(angles)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE of x [B, T, N, H] with `rope_cos_sin`'s tables: rotate the halves of the head dim (fp32)."""
    if _backend() == "cpu" and not current().reference:
        return cpu.rope(x, cos, sin)
    return xla.rope(x, cos, sin)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float,
    causal: bool = False,
    filled: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention with grouped kv heads; scores and softmax in fp32.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] bool (True = attend) or None -> [B, T, N, H].
    A row with nothing to attend gets uniform weights (as transformers' additive finfo.min mask does).
    `causal=True` promises self-attention without a cache (T == S) whose mask is causal by index with
    key padding, mask[b, t, s] = valid[b, s] & (s <= t) (None: every key valid); fused kernels use
    that structure (skipping the blocks above the diagonal). `filled` (an int32 scalar, traced)
    promises that key slots from `filled` on are empty (a KV cache being filled): one-query steps (a
    decode step) then read only the filled blocks of the cache (`xla.attention_filled`) on every
    backend, instead of all S slots at every step."""
    backend = "reference" if current().reference else _backend()
    if filled is not None and q.shape[1] == 1:  # XLA ops themselves: the reference runs them too
        return xla.attention_filled(q, k, v, mask, filled, scale=scale)
    if current().attention == "blocked":  # any backend: the planner's stand-in for a fused kernel
        if causal and mask is None:
            t = q.shape[1]
            mask = jnp.broadcast_to(jnp.tri(t, dtype=bool), (q.shape[0], t, t))
        return xla.attention_blocked(q, k, v, mask, scale=scale)
    if backend == "gpu":
        return gpu.attention(q, k, v, mask, scale=scale, causal=causal)
    if backend == "tpu":
        return tpu.attention(q, k, v, mask, scale=scale, causal=causal)
    if backend == "cpu":
        return cpu.attention(q, k, v, mask, scale=scale, causal=causal)
    if causal and mask is None:
        t = q.shape[1]
        mask = jnp.broadcast_to(jnp.tri(t, dtype=bool), (q.shape[0], t, t))
    return xla.attention(q, k, v, mask, scale=scale)


def exact_compiler_options(policy: Policy, enabled: bool = True) -> dict | None:
    """XLA options for programs whose rounding must match another program's (the RL passes: the
    update step's first forward must round like the values / log-prob pass so the first ratio is
    exactly 1). On CPU: no YNNPACK fusions (which XLA:CPU picks per program; 20-35% slower RL
    passes at the tiny configs' sizes); None on other backends or when not `enabled`."""
    if not enabled or policy.backend != "cpu":
        return None
    return dict(cpu.EXACT_COMPILER_OPTIONS)


def decode_compiler_options(policy: Policy) -> dict | None:
    """XLA options for the sampler's decode loop: on CPU only matmuls go to YNNPACK (its elementwise
    kernels cost ~0.1 ms each for the decode's tiny arrays); None elsewhere."""
    return dict(cpu.DECODE_COMPILER_OPTIONS) if policy.backend == "cpu" else None


def peak_products(dtype) -> list:
    """Jitted [n, n] x [n, n] products the steps may run on this backend (MFU takes the best)."""
    if jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu":
        return cpu.peak_products()
    return [jax.jit(lambda x: x @ x)]

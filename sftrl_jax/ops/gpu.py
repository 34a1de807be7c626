"""The GPU backend of the seam: cuDNN's fused (flash) attention through `jax.nn.dot_product_attention`
where it takes the shapes, XLA otherwise.

cuDNN takes bf16/fp16 q/k/v with head dim a multiple of 8 up to 128 and grouped kv heads; the mask
goes in as a [B, 1, T, S] boolean (causal self-attention also says `is_causal`, so the kernel skips
the blocks above the diagonal). fp32 (our parity tests) and anything cuDNN refuses at trace time
run the XLA ops of `ops.xla`. Projections and RoPE are XLA's: its GPU matmuls are cuBLAS already.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from sftrl_jax.ops import policy as policy_lib
from sftrl_jax.ops import xla

log = logging.getLogger(__name__)
_refused: set = set()  # shapes cuDNN refused (logged once each)


def cudnn_takes(q: jax.Array, k: jax.Array) -> bool:
    """Whether the shapes and dtypes are in cuDNN's fused-attention envelope."""
    h = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype and h % 8 == 0 and h <= 128


def attention(q, k, v, mask, *, scale: float, causal: bool = False) -> jax.Array:
    forced = policy_lib.current().attention
    b, t = q.shape[:2]
    if causal and mask is None:
        mask = jnp.broadcast_to(jnp.tri(t, dtype=bool), (b, t, t))
    if forced in (None, "cudnn") and cudnn_takes(q, k):
        try:
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=None if mask is None else mask[:, None],
                scale=scale,
                is_causal=causal and k.shape[1] == t,
                implementation="cudnn",
            )
        except (ValueError, NotImplementedError, RuntimeError) as e:
            if forced == "cudnn":
                raise
            key = (q.shape, k.shape, str(q.dtype))
            if key not in _refused:
                _refused.add(key)
                log.info("cuDNN attention refused q %s k %s (%s); using XLA's ops", q.shape, k.shape, e)
    return xla.attention(q, k, v, mask, scale=scale)

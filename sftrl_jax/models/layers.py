"""Building blocks shared by the text and vision towers.

Shape legend (STYLE.md §1): B batch, T query length, S key/value length, D model width, F MLP
width, N query heads, K kv heads, G query heads per kv head, H head dim, V vocab.

Every parameter is an `nnx.Param` whose `out_sharding` metadata holds *logical* axis names;
`sftrl_jax.parallel.rules` maps them to mesh axes. `eager_sharding=False`: building a module never
needs a mesh; shardings are applied when the state is created or loaded (see `models/build.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax.models import config as config_lib

# Initializers by name. The name is kept in the parameter's metadata (`init`) so that
# `build.create_model` can draw the same distributions on the host, shard by shard, without
# compiling an init program (XLA takes ~40 s on CPU to compile threefry for even the tiny model).
INITS: dict[str, tuple[float, float]] = {  # name -> (mean, stddev)
    "normal": (0.0, 0.02),
    "ones": (1.0, 0.0),
    "zeros": (0.0, 0.0),
    "gate": (0.0, 1.0),  # random init only serves tests: non-zero gates exercise every path
}
normal, ones, zeros, gate_init = "normal", "ones", "zeros", "gate"


class KeyGen:
    """Fresh init keys by `fold_in(base, n)` with a Python counter.

    Drawing from `nnx.Rngs` once per parameter is slow under tracing (each draw updates a Variable,
    whose sharding check formats a tracer error message): ~20 s to build the 11B model abstractly
    versus well under a second with this.
    """

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    @classmethod
    def of(cls, rngs: nnx.Rngs | KeyGen) -> KeyGen:
        return rngs if isinstance(rngs, KeyGen) else cls(rngs.params())

    def __call__(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def param(rngs: nnx.Rngs | KeyGen, init: str, shape: Sequence[int], names: Sequence[str | None], dtype) -> nnx.Param:
    """A parameter of `shape` whose dims carry the logical axis `names`, drawn from `INITS[init]`."""
    if len(shape) != len(names):
        raise ValueError(f"shape {tuple(shape)} and names {tuple(names)} differ in length")
    key = rngs() if isinstance(rngs, KeyGen) else rngs.params()
    mean, std = INITS[init]
    value = mean + std * jax.random.normal(key, tuple(shape), dtype) if std else jnp.full(shape, mean, dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, init=init)


# --------------------------------------------------------------------------------------------------
# Dense projections


_CPU_GEMM = contextvars.ContextVar("sftrl_cpu_gemm", default=False)
_CAUSAL_KERNEL = contextvars.ContextVar("sftrl_causal_kernel", default=True)


@contextlib.contextmanager
def cpu_gemm(enabled: bool = True, *, causal_kernel: bool = True) -> Iterator[None]:
    """While tracing under this context, fp32 `dense` and `attention` products (forward and backward)
    run as `kernels.gemm` (OpenBLAS) instead of XLA's matmul; unless `causal_kernel` is False, also
    `attention(..., causal=True)` as `kernels.causal_attention`, `rotate` as `kernels.rope` and
    `dense_fused` as one product (the RL passes turn these off: with them the first update's
    ratio of the tests' RL runs is not bitwise 1, 2.4e-7 with the causal kernel); a no-op when the
    kernels are unavailable. Only for a computation on one CPU device (XLA would gather a sharded operand for
    the call). The trace-time switch of `sft.train.make_train_step(..., cpu_gemm=True)` and the RL
    steps (which keep the causal attention in XLA ops, see `rl.train`)."""
    token = _CPU_GEMM.set(bool(enabled))
    token_causal = _CAUSAL_KERNEL.set(bool(causal_kernel))
    try:
        yield
    finally:
        _CAUSAL_KERNEL.reset(token_causal)
        _CPU_GEMM.reset(token)


def with_cpu_gemm(fn, enabled: bool, *, causal_kernel: bool = True):
    """`fn` traced under `cpu_gemm(enabled, causal_kernel=...)` (wrap a step function before `jax.jit`)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with cpu_gemm(enabled, causal_kernel=causal_kernel):
            return fn(*args, **kwargs)

    return wrapped


def _use_gemm(x: jax.Array, w: jax.Array, out_dtype) -> bool:
    if not _CPU_GEMM.get() or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return False
    if out_dtype is not None and jnp.dtype(out_dtype) != jnp.float32:
        return False
    from sftrl_jax import kernels

    return kernels.gemm_available()


def dense(x: jax.Array, w: jax.Array, *, n_in: int = 1, out_dtype=None) -> jax.Array:
    """Contract the last `n_in` axes of x with the first `n_in` axes of w: [..., *in] x [*in, *out] -> [..., *out].

    The same value as the equivalent `jnp.einsum`, as one 2-D matmul [M, K] x [K, N] with a
    hand-written backward pass. Why: autodiff of an einsum gives the weight gradient as x^T g, a dot
    contracting x's *leading* axis, which XLA:CPU cannot give to its fast (YNNPACK) matmul and runs
    ~2x slower (on Eigen, after transposing the big operand). Here the backward transposes the
    smaller operand, x [M, K] -> [K, M], behind an optimization barrier (so the simplifier does not
    fold it back into the dot), and computes dW = x^T @ g as a plain row-major matmul. On GPU/TPU the
    cost is one transpose of the activations per projection. `out_dtype`: the matmul's result type
    (e.g. fp32 logits from bf16 inputs). Under `cpu_gemm()` the fp32 products (forward, dx = g w^T
    and dW = x^T g, the last two without any transpose copy) run as OpenBLAS calls instead.
    """
    lead, out = x.shape[: x.ndim - n_in], w.shape[n_in:]
    k = int(np.prod(w.shape[:n_in]))
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    y = _blas_bmm(x2, w2, False, False) if _use_gemm(x, w, out_dtype) else _matmul(x2, w2, out_dtype)
    return y.reshape(*lead, *out)


def dense_fused(x: jax.Array, ws: Sequence[jax.Array]) -> list[jax.Array]:
    """[dense(x, w) for w in ws] (each w [D, *out_i]), as one matmul against the weights
    concatenated along their outputs under `cpu_gemm()` (with its causal kernel: the SFT steps; the
    RL passes keep separate products, see `cpu_gemm`), where the separate products are smaller
    than one wide one: the Llama q/k/v and gate/up projections. Why: at batch 8 x 256 tokens and
    D 512, the k and v products (N 256) run at ~130 GF/s on OpenBLAS, the fused q|k|v (N 1024) at
    ~150, and the backward's dx becomes one product with K 1024 instead of three summed (one layer's
    q/k/v forward and backward: 51 -> 45 ms). Outside `cpu_gemm()` (XLA's matmuls, sharded weights)
    the products stay separate, so no concatenation crosses a sharded axis."""
    if len(ws) < 2 or not _CAUSAL_KERNEL.get() or not all(_use_gemm(x, w, None) for w in ws):
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
    (each gradient is one more product with transposes read in place: no transpose copies). The
    OpenBLAS path of `dense` and `attention` under `cpu_gemm()`."""
    from sftrl_jax import kernels

    return kernels.gemm(a, b, trans_a=trans_a, trans_b=trans_b)


def _blas_bmm_fwd(a, b, trans_a, trans_b):
    return _blas_bmm(a, b, trans_a, trans_b), (a, b)


def _blas_bmm_bwd(trans_a, trans_b, res, g):
    from sftrl_jax import kernels

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


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, the reduction in fp32."""

    def __init__(self, dim: int, *, eps: float, name: str = "embed", param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, ones, (dim,), (name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale.astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """(x - mean) / std * scale + bias, statistics in fp32."""

    def __init__(self, dim: int, *, eps: float, name: str = "vision_embed", param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, ones, (dim,), (name,), param_dtype)
        self.bias = param(rngs, zeros, (dim,), (name,), param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale.astype(jnp.float32) + self.bias.astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(x @ gate) * (x @ up)): the Llama MLP."""

    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.gate_proj = param(rngs, normal, (dim, hidden), ("embed", "mlp"), param_dtype)
        self.up_proj = param(rngs, normal, (dim, hidden), ("embed", "mlp"), param_dtype)
        self.down_proj = param(rngs, normal, (hidden, dim), ("mlp", "embed"), param_dtype)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = dense_fused(x, [self.gate_proj.astype(self.dtype), self.up_proj.astype(self.dtype)])  # [B, T, F]
        return dense(jax.nn.silu(gate) * up, self.down_proj.astype(self.dtype))  # [B, T, D]


def gate(g: nnx.Param, dtype) -> jax.Array:
    """tanh of a shape-[1] gate parameter, as a scalar."""
    return jnp.tanh(g[0].astype(jnp.float32)).astype(dtype)


# --------------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: config_lib.TextConfig) -> np.ndarray:
    """Inverse frequencies [H/2] in fp32, with Llama 3.1's frequency-dependent scaling if `llama3`."""
    dim = cfg.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    if cfg.rope_type == "default":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, the band in
    # between interpolated smoothly.
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, H/2] (fp32) of the RoPE angles positions [B, T] x inv_freq [H/2], computed once
    per forward by the text model and shared by every layer's q and k (`rotate`)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE of x [B, T, N, H] with `rope_cos_sin`'s tables [B, T, H/2]: rotate halves of the head dim.
    Under `cpu_gemm()` (with its causal kernel) an fp32 rotation runs as `kernels.rope`, forward and
    backward: XLA:CPU fuses the tables' trigonometry into this loop and evaluates it for every head
    and half, even with the tables computed once and shared (4.4 ms for q at 8 x 256 x 8 x 64; 0.54
    with the tables as inputs of the program; the kernel 0.25)."""
    if x.dtype == jnp.float32 and _CPU_GEMM.get() and _CAUSAL_KERNEL.get():
        from sftrl_jax import kernels

        if kernels.available():
            return _rope_kernel(x, cos.astype(jnp.float32), sin.astype(jnp.float32))
    return _rotate(x, cos, sin)


@jax.custom_vjp
def _rope_kernel(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    from sftrl_jax import kernels

    return kernels.rope(x, cos, sin)


def _rope_kernel_fwd(x, cos, sin):
    return _rope_kernel(x, cos, sin), (cos, sin)


def _rope_kernel_bwd(res, g):
    from sftrl_jax import kernels

    cos, sin = res
    # The tables come from integer positions: no gradient flows into them.
    return kernels.rope(g, cos, sin, inverse=True), jnp.zeros_like(cos), jnp.zeros_like(sin)


_rope_kernel.defvjp(_rope_kernel_fwd, _rope_kernel_bwd)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate halves of the head dim: x [B, T, N, H], positions [B, T] int."""
    return rotate(x, *rope_cos_sin(positions, inv_freq))


# --------------------------------------------------------------------------------------------------
# Attention


def causal_block(t: int) -> int:
    """Query rows per block of `attention(..., causal=True)` for T = t: 64, and 128 from 1024 on
    (one layer's attention, forward and backward, on this 2-core CPU: T 1024 158.6 ms unblocked,
    95.3 ms in blocks of 64, 88.1 in blocks of 128; T 2048 353.2, 192.9 in 128, 198.4 in 256)."""
    return 64 if t < 1024 else 128


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, scale: float, causal: bool = False
) -> jax.Array:
    """Softmax attention with grouped kv heads; scores and softmax in fp32.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] bool (True = attend) or None -> [B, T, N, H].
    A row with nothing to attend gets uniform weights (as transformers' additive finfo.min mask does).

    `causal=True` promises that query i attends no key j > i (T == S, the mask within the causal
    pattern by index; a None mask then means exactly that pattern). The queries then run in blocks
    of `causal_block(T)` rows, each against the keys up to its last row only: the same result (up
    to fp32 rounding order) with about (n + 1) / 2n of the products' FLOPs for n blocks (62.5% at
    T = 256, where one layer's forward and backward took 34 instead of 50 ms on this CPU; 1.8x
    faster at T = 1024 and 2048). In fp32 under `cpu_gemm()` the blocks run inside one native call
    per pass (`kernels.causal_attention`, flash-style: the backward pass recomputes the
    probabilities from the row log-sum-exp instead of keeping [B, N, T, T] of them).
    """
    b, t = q.shape[:2]
    if causal and mask is None:
        mask = jnp.broadcast_to(jnp.tri(t, dtype=bool), (b, t, t))
    if causal and k.shape[1] == t and _CAUSAL_KERNEL.get() and _use_gemm(q, k, None) and v.dtype == jnp.float32:
        return _causal_kernel(q, k, v, mask, float(scale))
    if not causal or k.shape[1] != t or causal_block(t) >= t:
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
    """`attention(..., causal=True)` in fp32 under `cpu_gemm()`: `kernels.causal_attention`, forward
    and backward (one call each per layer, on the model's own [B, T, heads, H] layout)."""
    return _causal_kernel_fwd(q, k, v, mask, scale)[0]


def _causal_kernel_fwd(q, k, v, mask, scale):
    from sftrl_jax import kernels

    out, lse = kernels.causal_attention(q, k, v, mask, scale=scale, block=causal_block(q.shape[1]))
    return out, (q, k, v, mask, out, lse)


def _causal_kernel_bwd(scale, res, g):
    from sftrl_jax import kernels

    q, k, v, mask, out, lse = res
    dq, dk, dv = kernels.causal_attention_grad(q, k, v, mask, out, lse, g, scale=scale, block=causal_block(q.shape[1]))
    return dq, dk, dv, None


_causal_kernel.defvjp(_causal_kernel_fwd, _causal_kernel_bwd)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float) -> jax.Array:
    """`attention` over every key: q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] or None."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    # Batch dims (B, K) first and the G query heads of a kv head folded into the query axis: XLA then
    # emits plain batched matmuls (about 3x faster on CPU than the 5-d einsum with batch dims inside).
    q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)  # [B, K, G*T, H]
    k = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    v = v.transpose(0, 2, 1, 3)
    # Under `cpu_gemm()` the fp32 products of both passes run as batched OpenBLAS calls.
    blas = _use_gemm(q, k, None) and v.dtype == jnp.float32
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

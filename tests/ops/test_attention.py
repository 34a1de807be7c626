"""`ops.attention(..., causal=True)`: queries in blocks against the keys up to each block's last
row only; the same values and gradients as attention over every key with the same causal mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import kernels, ops

B, T, N, K, H = 3, 150, 4, 2, 16  # 150 rows: blocks of 64, 64 and 22


def _inputs():
    rng = np.random.default_rng(0)
    q, k, v, g = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) for n in (N, K, K, N))
    valid = np.ones((B, T), bool)
    valid[1, :70] = False  # left padding beyond the first block: rows 0..69 attend to nothing
    valid[2, 140:] = False  # right padding
    mask = jnp.asarray(valid[:, None, :] & np.tri(T, dtype=bool)[None])
    return q, k, v, g, mask


def _grad_fn(mask, causal, gemm):
    def loss(q, k, v, g):
        return jnp.sum(ops.attention(q, k, v, mask, scale=H**-0.5, causal=causal) * g)

    return jax.jit(ops.traced_with(jax.value_and_grad(loss, (0, 1, 2)), ops.Policy(cpu_kernels=gemm)))


def _n_dots(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_blocks_are_used_and_cut_the_products():
    q, k, v, g, mask = _inputs()
    assert ops.cpu.causal_block(T) == 64 and ops.cpu.causal_block(1024) == 128
    full = _n_dots(lambda q, k, v: ops.attention(q, k, v, mask, scale=0.25), q, k, v)
    blocked = _n_dots(lambda q, k, v: ops.attention(q, k, v, mask, scale=0.25, causal=True), q, k, v)
    assert (full, blocked) == (2, 6)  # q k^T and p v, once or per block
    # Keys per block: 64, 128, 150 of 150 -> the score matrices hold (64*64 + 64*128 + 22*150) / 150^2.
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: ops.attention(q, k, v, mask, scale=0.25, causal=True))(q, k, v))
    for shape in ("f32[3,2,128,64]", "f32[3,2,128,128]", "f32[3,2,44,150]"):  # [B, K, G*rows, keys]
        assert shape in jaxpr, shape


@pytest.mark.parametrize("gemm", [False, True])
def test_blocked_equals_full_values_and_gradients(gemm):
    if gemm and not kernels.gemm_available():
        pytest.skip("no OpenBLAS gemm kernel here")
    q, k, v, g, mask = _inputs()
    (v1, g1), (v2, g2) = _grad_fn(mask, True, gemm)(q, k, v, g), _grad_fn(mask, False, gemm)(q, k, v, g)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-4)
    for a, c in zip(g1, g2):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    out = ops.attention(q, k, v, mask, scale=H**-0.5, causal=True)
    ref = ops.attention(q, k, v, mask, scale=H**-0.5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # Rows with nothing to attend: uniform over all 150 keys (transformers' convention), not over a block.
    uniform = np.repeat(np.asarray(v[1]).mean(axis=0), N // K, axis=0)  # [N, H]
    np.testing.assert_allclose(np.asarray(out[1, :70]), np.broadcast_to(uniform, (70, N, H)), atol=1e-6)


def test_no_mask_means_the_causal_pattern():
    q, k, v, _, mask = _inputs()
    tri = jnp.broadcast_to(jnp.tri(T, dtype=bool), (B, T, T))
    ref = ops.attention(q, k, v, tri, scale=0.25)
    np.testing.assert_allclose(ops.attention(q, k, v, None, scale=0.25, causal=True), ref, rtol=1e-5, atol=1e-6)
    # Short sequences and key lengths other than T (a KV cache) take the unblocked path.
    short = ops.attention(q[:, :40], k[:, :40], v[:, :40], None, scale=0.25, causal=True)
    np.testing.assert_allclose(short, ops.attention(q[:, :40], k[:, :40], v[:, :40], tri[:, :40, :40], scale=0.25))
    cached = lambda q, k, v: ops.attention(q, k, v, mask[:, :, :100], scale=0.25, causal=True)  # noqa: E731
    assert _n_dots(cached, q, k[:, :100], v[:, :100]) == 2


needs_gemm = pytest.mark.skipif(not kernels.gemm_available(), reason="no OpenBLAS gemm kernel here")


@needs_gemm
def test_cpu_gemm_runs_the_causal_kernel_forward_and_backward():
    q, k, v, g, mask = _inputs()
    hlo = _grad_fn(mask, True, True).lower(q, k, v, g).as_text()
    assert hlo.count("sftrl_causal_attention_fwd_f32") == 1 and hlo.count("sftrl_causal_attention_bwd_f32") == 1
    assert "sftrl_gemm_f32" not in hlo  # no separate score products
    # Without causal=True (or with a KV cache's S != T) the products are batched gemm calls instead.
    assert "sftrl_causal_attention" not in _grad_fn(mask, False, True).lower(q, k, v, g).as_text()


@needs_gemm
def test_causal_kernel_same_bits_for_any_thread_count():
    q, k, v, g, mask = _inputs()
    kw = dict(scale=0.25, block=64)
    one = jax.jit(lambda *a: kernels.causal_attention(*a, **kw, threads=1))(q, k, v, mask)
    every = jax.jit(lambda *a: kernels.causal_attention(*a, **kw))(q, k, v, mask)
    for a, c in zip(one, every):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    out, lse = every
    assert lse.shape == (B, K, T * N // K)
    assert np.isinf(np.asarray(lse)).reshape(B, K, T, -1)[1, :, :70].all()  # rows with no key
    assert np.isfinite(np.asarray(lse)).reshape(B, K, T, -1)[1, :, 70:].all()
    grads = [
        jax.jit(lambda *a, t=t: kernels.causal_attention_grad(*a, out, lse, g, **kw, threads=t))(q, k, v, mask)
        for t in (1, 0)
    ]
    for a, c in zip(*grads):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@needs_gemm
def test_causal_kernel_bad_input():
    q, k, v, _, mask = _inputs()
    with pytest.raises(TypeError, match="q must be a 4-D float32 array"):
        kernels.causal_attention(q[0], k, v, mask, scale=1.0, block=64)
    with pytest.raises(ValueError, match=r"do not fit \[B, T, N, H\], \[B, T, K, H\] with N a multiple of K"):
        kernels.causal_attention(q[:, :, :3], k, v, mask, scale=1.0, block=64)
    with pytest.raises(ValueError, match=r"mask \(3, 150, 100\) is not \[B, T, T\] = \(3, 150, 150\)"):
        kernels.causal_attention(q, k, v, mask[:, :, :100], scale=1.0, block=64)


@pytest.mark.parametrize(("t", "s", "causal"), [(64, 64, True), (64, 40, False)])
def test_the_planners_blocked_attention_equals_the_reference(t, s, causal):
    """`ops.xla.attention_blocked` (the planner's stand-in for a fused kernel: query blocks, the
    backward recomputing each block's probabilities): the reference's values and gradients, causal
    self-attention and cross-attention with a padded mask, a row with nothing to attend (uniform)
    included; and it keeps no [B, N, T, S] array (the largest intermediate of its jaxpr is a block's)."""
    rng = np.random.default_rng(1)
    q, g = (jnp.asarray(rng.standard_normal((2, t, N, H)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((2, s, K, H)), jnp.float32) for _ in range(2))
    mask = rng.random((2, t, s)) > 0.3
    if causal:
        mask &= np.tri(t, dtype=bool)[None]
    mask[0, 20] = False
    mask = jnp.asarray(mask)

    def run(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v) * g)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(q, k, v)

    ref = run(lambda q, k, v: ops.xla.attention(q, k, v, mask, scale=0.3))
    blocked = run(lambda q, k, v: ops.xla.attention_blocked(q, k, v, mask, scale=0.3, block=16))
    policy = ops.traced_with(lambda q, k, v: ops.attention(q, k, v, mask, scale=0.3), ops.Policy(attention="blocked"))
    for a, b in zip(
        jax.tree.leaves(ref), jax.tree.leaves(run(policy))
    ):  # the policy routes to it (block 512: T fits one)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(blocked)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, rtol=0)
    jaxpr = jax.make_jaxpr(jax.grad(lambda q: jnp.sum(ops.xla.attention_blocked(q, k, v, mask, scale=0.3, block=16))))(
        q
    )
    largest = max(int(np.prod(x.aval.shape)) for e in jaxpr.jaxpr.eqns for x in e.outvars if hasattr(x.aval, "shape"))
    assert largest < 2 * N * t * s  # [2, K, G, 16, S] per block, not [2, N, T, S]

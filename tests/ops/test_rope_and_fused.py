"""The SFT step's CPU paths for RoPE and the fused projections: `ops.rope` as `kernels.rope`
(forward and backward) under the kernel policy, and `ops.dense_fused` as one product; the same values
and gradients as the XLA ops they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import kernels, ops

B, T, N, H = 3, 37, 4, 16
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no CPU kernels here")
needs_gemm = pytest.mark.skipif(not kernels.gemm_available(), reason="no OpenBLAS gemm kernel here")


def _rope_inputs():
    rng = np.random.default_rng(0)
    x, g = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(2))
    positions = jnp.asarray(rng.integers(0, 5000, (B, T)))
    inv_freq = (1.0 / 500000.0 ** (np.arange(0, H, 2) / H)).astype(np.float32)
    return x, g, ops.rope_cos_sin(positions, inv_freq), positions, inv_freq


def test_rope_table_matches_the_rotation_formula():
    x, _, (cos, sin), positions, inv_freq = _rope_inputs()
    angles = np.asarray(positions, np.float64)[..., None] * inv_freq.astype(np.float64)
    x64 = np.asarray(x, np.float64)
    x1, x2 = x64[..., : H // 2], x64[..., H // 2 :]
    c, s = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    # fp32 angles up to 5000 rad: cos/sin of the rounded angle differ from float64's by ~5000 * 2^-24.
    np.testing.assert_allclose(np.asarray(ops.rope(x, cos, sin)), ref, rtol=0, atol=2e-3)
    np.testing.assert_array_equal(
        np.asarray(ops.rope(x, *ops.rope_cos_sin(positions, inv_freq))), ops.rope(x, cos, sin)
    )
    # Rotations keep the norm of each pair.
    y = np.asarray(ops.rope(x, cos, sin), np.float64)
    pairs = lambda a: a[..., : H // 2] ** 2 + a[..., H // 2 :] ** 2  # noqa: E731
    np.testing.assert_allclose(pairs(y), pairs(x64), rtol=1e-5)


@needs_kernels
def test_rope_kernel_equals_the_xla_rotation_forward_and_backward():
    x, g, (cos, sin), _, _ = _rope_inputs()
    ref = jax.jit(ops.xla.rope)(x, cos, sin)
    got = jax.jit(lambda x, c, s: kernels.rope(x, c, s))(x, cos, sin)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-6)
    _, vjp = jax.vjp(lambda x: ops.xla.rope(x, cos, sin), x)
    back = jax.jit(lambda g, c, s: kernels.rope(g, c, s, inverse=True))(g, cos, sin)
    np.testing.assert_allclose(np.asarray(back), np.asarray(vjp(g)[0]), rtol=0, atol=1e-6)
    # The inverse undoes the rotation.
    np.testing.assert_allclose(np.asarray(kernels.rope(got, cos, sin, inverse=True)), np.asarray(x), atol=1e-5)


@needs_gemm
def test_cpu_gemm_rotates_with_the_kernel_and_gives_the_same_gradients():
    x, g, (cos, sin), _, _ = _rope_inputs()

    def fn(enabled, causal_kernel=True):
        loss = lambda x: jnp.sum(ops.rope(x, cos, sin) * g)  # noqa: E731
        return jax.jit(
            ops.traced_with(jax.value_and_grad(loss), ops.Policy(cpu_kernels=enabled, exact=not causal_kernel))
        )

    assert "sftrl_rope_f32" in fn(True).lower(x).as_text()
    assert "sftrl_rope_f32" not in fn(False).lower(x).as_text()
    assert "sftrl_rope_f32" not in fn(True, causal_kernel=False).lower(x).as_text()  # the RL passes
    (v1, g1), (v0, g0) = fn(True)(x), fn(False)(x)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(kernels.rope(g, cos, sin, inverse=True)), atol=0)


@needs_kernels
def test_rope_kernel_same_bits_for_any_thread_count():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 300, 8, 64)), jnp.float32)  # several blocks of positions
    cos, sin = ops.rope_cos_sin(jnp.asarray(rng.integers(0, 9000, (4, 300))), np.linspace(1, 1e-4, 32))
    outs = [jax.jit(lambda x, c, s, t=t: kernels.rope(x, c, s, threads=t))(x, cos, sin) for t in (1, 2, 0)]
    for out in outs[1:]:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(outs[0]))


@needs_kernels
def test_rope_kernel_bad_input():
    x, _, (cos, sin), _, _ = _rope_inputs()
    with pytest.raises(ValueError, match=r"rope: sin float32 \(3, 36, 8\) is not float32 \[B, T, H/2\]"):
        kernels.rope(x, cos, sin[:, :36])
    with pytest.raises(TypeError, match="H even"):
        kernels.rope(x[..., :15], cos, sin)
    with pytest.raises(TypeError, match="float32"):
        kernels.rope(x.astype(jnp.bfloat16), cos, sin)


def _projections():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 24)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal(s) * 0.2, jnp.float32) for s in ((24, 4, 6), (24, 2, 6), (24, 2, 6))]
    gs = [jnp.asarray(rng.standard_normal((2, 9, *w.shape[1:])), jnp.float32) for w in ws]
    return x, ws, gs


@pytest.mark.parametrize("enabled", [False, True])
def test_dense_fused_equals_separate_products(enabled):
    if enabled and not kernels.gemm_available():
        pytest.skip("no OpenBLAS gemm kernel here")
    x, ws, gs = _projections()

    def loss(fused):
        def fn(x, ws):
            outs = ops.dense_fused(x, ws) if fused else [ops.dense(x, w) for w in ws]
            return sum(jnp.sum(o * g) for o, g in zip(outs, gs, strict=True)), outs

        return jax.jit(ops.traced_with(jax.value_and_grad(fn, (0, 1), has_aux=True), ops.Policy(cpu_kernels=enabled)))

    (v1, outs1), (dx1, dws1) = loss(True)(x, ws)
    (v0, outs0), (dx0, dws0) = loss(False)(x, ws)
    for a, b, w in zip(outs1, outs0, ws, strict=True):
        assert a.shape == (2, 9, *w.shape[1:])
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx1), np.asarray(dx0), rtol=0, atol=1e-5)
    for a, b in zip(dws1, dws0, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    ref = [np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), np.asarray(w, np.float64)) for w in ws]
    for a, r in zip(outs1, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), r, rtol=0, atol=1e-5)
    # One product for the three projections under cpu_gemm (forward), one each otherwise.
    hlo = (
        jax.jit(ops.traced_with(lambda x, ws: ops.dense_fused(x, ws), ops.Policy(cpu_kernels=enabled)))
        .lower(x, ws)
        .as_text()
    )
    assert hlo.count("sftrl_gemm_f32") == (1 if enabled else 0)

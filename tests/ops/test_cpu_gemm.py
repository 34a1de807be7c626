"""`kernels.gemm` (OpenBLAS behind an XLA FFI call) and `ops.Policy(cpu_kernels=True)`, the switch that routes the
fp32 projections of a training step to it: values against float64, gradients against XLA's dot,
where it is used and where not, bad input, and the switch-off."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import kernels, ops
from sftrl_jax.parallel import mesh as mesh_lib

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the kernels cannot be built here")


@pytest.fixture(scope="module")
def built():
    # With a compiler and the scipy-openblas64 dependency installed, gemm must load: failing is a bug.
    assert kernels.gemm_available(), kernels._state.get("gemm_error") or kernels.error()


def _operands(rng, m, k, n, ta, tb):
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    exact = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    return a, b, exact


@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 5, 3), (300, 64, 40), (40, 64, 300), (513, 130, 257)])
def test_gemm_is_as_exact_as_an_fp32_product(built, m, k, n, ta, tb):
    """Every layout and shapes that split over rows (m >= n), over columns, or not at all."""
    a, b, exact = _operands(np.random.default_rng(m + k + n), m, k, n, ta, tb)
    got = np.asarray(jax.jit(lambda a, b: kernels.gemm(a, b, trans_a=bool(ta), trans_b=bool(tb)))(a, b))
    assert got.shape == (m, n) and got.dtype == np.float32
    # fp32 rounding of a k-term sum: |error| <= k * eps * sum |a||b| (a loose bound; measured ~1e-6 relative)
    bound = k * np.finfo(np.float32).eps * (np.abs(a).max() * np.abs(b).max() * k)
    np.testing.assert_allclose(got, exact, rtol=0, atol=bound)
    # one thread (no split) gives the same values: each output's sum runs over k in the same BLAS kernel
    one = np.asarray(jax.jit(lambda a, b: kernels.gemm(a, b, trans_a=bool(ta), trans_b=bool(tb), threads=1))(a, b))
    np.testing.assert_allclose(one, got, rtol=1e-6, atol=1e-6 * np.abs(exact).max())


def test_gemm_with_an_empty_inner_axis_is_zero(built):
    out = np.asarray(jax.jit(kernels.gemm)(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32)))
    np.testing.assert_array_equal(out, np.zeros((3, 4), np.float32))


def test_gemm_refuses_bad_input(built):
    with pytest.raises(TypeError, match=r"a must be a float32 array of 2 or more axes, got float16 \(2, 3\)"):
        kernels.gemm(np.ones((2, 3), np.float16), np.ones((3, 2), np.float32))
    with pytest.raises(TypeError, match=r"b must be a float32 array of 2 or more axes, got float32 \(3,\)"):
        kernels.gemm(np.ones((2, 3), np.float32), np.ones((3,), np.float32))
    with pytest.raises(ValueError, match=r"op\(a\) is \(2, 3\) and op\(b\) is \(4, 2\)"):
        kernels.gemm(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"batch axes of a \(2, 2, 3\) and b \(3, 3, 2\) differ"):
        kernels.gemm(np.ones((2, 2, 3), np.float32), np.ones((3, 3, 2), np.float32))


@pytest.mark.parametrize("ta,tb", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize(
    "batch,m,k,n", [((1,), 300, 64, 40), ((3,), 40, 64, 300), ((2, 3), 33, 17, 65), ((5,), 1, 8, 1)]
)
def test_batched_gemm_is_one_product_per_leading_index(built, batch, m, k, n, ta, tb):
    """Leading axes are a batch: fewer products than threads (each split), more (one call each)."""
    rng = np.random.default_rng(m * n + k)
    a = rng.standard_normal((*batch, *((k, m) if ta else (m, k)))).astype(np.float32)
    b = rng.standard_normal((*batch, *((n, k) if tb else (k, n)))).astype(np.float32)
    op_a = np.swapaxes(a, -1, -2) if ta else a
    op_b = np.swapaxes(b, -1, -2) if tb else b
    exact = op_a.astype(np.float64) @ op_b.astype(np.float64)
    got = np.asarray(jax.jit(lambda a, b: kernels.gemm(a, b, trans_a=bool(ta), trans_b=bool(tb)))(a, b))
    assert got.shape == (*batch, m, n)
    bound = k * np.finfo(np.float32).eps * (np.abs(a).max() * np.abs(b).max() * k)
    np.testing.assert_allclose(got, exact, rtol=0, atol=bound)
    # each product alone gives the same values as inside the batch
    flat_a, flat_b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    for i in range(flat_a.shape[0]):
        alone = np.asarray(
            kernels.gemm(jnp.asarray(flat_a[i]), jnp.asarray(flat_b[i]), trans_a=bool(ta), trans_b=bool(tb))
        )
        np.testing.assert_allclose(got.reshape(-1, m, n)[i], alone, rtol=1e-6, atol=1e-6 * np.abs(exact).max())


@pytest.mark.parametrize("n_heads,kv_heads", [(4, 2), (2, 2)])
def test_attention_under_cpu_gemm_equals_xla_value_and_gradients(built, n_heads, kv_heads):
    """q k^T and p v (and their four gradient products) as batched OpenBLAS calls; a padded row that
    attends to nothing keeps transformers' uniform weights."""
    b, t, h = 2, 7, 8
    kq, kk, kv, kg = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (b, t, n_heads, h))
    k = jax.random.normal(kk, (b, t, kv_heads, h))
    v = jax.random.normal(kv, (b, t, kv_heads, h))
    g = jax.random.normal(kg, (b, t, n_heads, h))
    mask = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0).at[1, 0].set(False)  # row 0 of example 1: nothing

    def loss(q, k, v):
        return jnp.sum(ops.attention(q, k, v, mask, scale=h**-0.5) * g)

    fn = jax.value_and_grad(loss, (0, 1, 2))
    blas, xla = jax.jit(ops.traced_with(fn, ops.Policy(cpu_kernels=True))), jax.jit(fn)
    assert blas.lower(q, k, v).as_text().count("sftrl_gemm_f32") == 6  # 2 forward + 4 backward
    assert "sftrl_gemm_f32" not in xla.lower(q, k, v).as_text()
    (v1, g1), (v2, g2) = blas(q, k, v), xla(q, k, v)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
    for a, c in zip(g1, g2):
        assert a.shape == c.shape and a.dtype == c.dtype
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


CASES = [  # (x shape, w shape, n_in)
    ((2, 5, 8), (8, 6), 1),
    ((3, 7, 8), (8, 3, 4), 1),
    ((2, 5, 3, 4), (3, 4, 8), 2),
]


@pytest.mark.parametrize("xs, ws, n_in", CASES)
def test_dense_under_cpu_gemm_equals_xla_value_and_gradients(built, xs, ws, n_in):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    g = jax.random.normal(kg, ops.dense(x, w, n_in=n_in).shape)

    def loss(x, w):
        return jnp.sum(ops.dense(x, w, n_in=n_in) * g)

    fn = jax.value_and_grad(loss, (0, 1))
    blas = jax.jit(ops.traced_with(fn, ops.Policy(cpu_kernels=True)))
    xla = jax.jit(fn)
    # the switch is what decides: three FFI calls (y, dx, dW) with it, none without
    assert blas.lower(x, w).as_text().count("sftrl_gemm_f32") == 3
    assert "sftrl_gemm_f32" not in xla.lower(x, w).as_text()
    (v1, (dx1, dw1)), (v2, (dx2, dw2)) = blas(x, w), xla(x, w)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
    for a, b in ((dx1, dx2), (dw1, dw2)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_gemm_leaves_bf16_and_mixed_products_to_xla(built):
    x = jnp.ones((4, 8), jnp.bfloat16)
    w = jnp.ones((8, 16), jnp.bfloat16)
    f = jax.jit(ops.traced_with(lambda x, w: ops.dense(x, w, out_dtype=jnp.float32), ops.Policy(cpu_kernels=True)))
    assert "sftrl_gemm_f32" not in f.lower(x, w).as_text()
    np.testing.assert_array_equal(f(x, w), np.full((4, 16), 8.0, np.float32))


def test_gemm_is_used_on_one_cpu_device_only(built, monkeypatch):
    assert _cpu_kernels(mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("fsdp=-1"), devices=jax.devices()[:1]))
    # a custom call is not partitioned: a mesh of several devices keeps XLA's dot
    assert not _cpu_kernels(mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("fsdp=-1"), devices=jax.devices()[:2]))
    monkeypatch.setenv("SFTRL_CPU_GEMM", "0")
    assert not kernels.gemm_available()
    assert not _cpu_kernels(mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("fsdp=-1"), devices=jax.devices()[:1]))


def test_gemm_falls_back_when_the_blas_cannot_load(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {k: v for k, v in kernels._state.items() if not k.startswith("gemm")})
    monkeypatch.setattr(kernels, "_registered", {k: v for k, v in kernels._registered.items() if k != "blas"})
    monkeypatch.setattr(kernels, "BLAS_MODULE", "no_such_blas_module")
    assert not kernels.gemm_available()
    assert "no_such_blas_module" in kernels._state["gemm_error"]
    x = jnp.ones((4, 8), jnp.float32)
    f = jax.jit(ops.traced_with(lambda x: ops.dense(x, x.T), ops.Policy(cpu_kernels=True)))
    assert "sftrl_gemm_f32" not in f.lower(x).as_text()
    np.testing.assert_array_equal(f(x), np.full((4, 4), 8.0, np.float32))


def _cpu_kernels(mesh) -> bool:
    return ops.policy_for(mesh).cpu_kernels

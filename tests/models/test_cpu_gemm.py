"""`kernels.gemm` (OpenBLAS behind an XLA FFI call) and `layers.cpu_gemm`, the switch that routes the
fp32 projections of a training step to it: values against float64, gradients against XLA's dot,
where it is used and where not, bad input, and the switch-off."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import kernels
from sftrl_jax.models import layers
from sftrl_jax.parallel import mesh as mesh_lib
from sftrl_jax.sft.train import use_cpu_gemm

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
    with pytest.raises(TypeError, match="a must be a 2-D float32"):
        kernels.gemm(np.ones((2, 3), np.float16), np.ones((3, 2), np.float32))
    with pytest.raises(TypeError, match="b must be a 2-D float32"):
        kernels.gemm(np.ones((2, 3), np.float32), np.ones((3, 2, 1), np.float32))
    with pytest.raises(ValueError, match=r"op\(a\) is \(2, 3\) and op\(b\) is \(4, 2\)"):
        kernels.gemm(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))


CASES = [  # (x shape, w shape, n_in)
    ((2, 5, 8), (8, 6), 1),
    ((3, 7, 8), (8, 3, 4), 1),
    ((2, 5, 3, 4), (3, 4, 8), 2),
]


@pytest.mark.parametrize("xs, ws, n_in", CASES)
def test_dense_under_cpu_gemm_equals_xla_value_and_gradients(built, xs, ws, n_in):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    g = jax.random.normal(kg, layers.dense(x, w, n_in=n_in).shape)

    def loss(x, w):
        return jnp.sum(layers.dense(x, w, n_in=n_in) * g)

    fn = jax.value_and_grad(loss, (0, 1))
    blas = jax.jit(layers.with_cpu_gemm(fn, True))
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
    f = jax.jit(layers.with_cpu_gemm(lambda x, w: layers.dense(x, w, out_dtype=jnp.float32), True))
    assert "sftrl_gemm_f32" not in f.lower(x, w).as_text()
    np.testing.assert_array_equal(f(x, w), np.full((4, 16), 8.0, np.float32))


def test_gemm_is_used_on_one_cpu_device_only(built, monkeypatch):
    assert use_cpu_gemm(mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("fsdp=-1"), devices=jax.devices()[:1]))
    # a custom call is not partitioned: a mesh of several devices keeps XLA's dot
    assert not use_cpu_gemm(mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("fsdp=-1"), devices=jax.devices()[:2]))
    monkeypatch.setenv("SFTRL_CPU_GEMM", "0")
    assert not kernels.gemm_available()
    assert not use_cpu_gemm(mesh_lib.make_mesh(mesh_lib.parse_mesh_spec("fsdp=-1"), devices=jax.devices()[:1]))


def test_gemm_falls_back_when_the_blas_cannot_load(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {k: v for k, v in kernels._state.items() if not k.startswith("gemm")})
    monkeypatch.setattr(kernels, "_registered", {k: v for k, v in kernels._registered.items() if k != "blas"})
    monkeypatch.setattr(kernels, "BLAS_MODULE", "no_such_blas_module")
    assert not kernels.gemm_available()
    assert "no_such_blas_module" in kernels._state["gemm_error"]
    x = jnp.ones((4, 8), jnp.float32)
    f = jax.jit(layers.with_cpu_gemm(lambda x: layers.dense(x, x.T), True))
    assert "sftrl_gemm_f32" not in f.lower(x).as_text()
    np.testing.assert_array_equal(f(x), np.full((4, 4), 8.0, np.float32))

"""`ops.dense` (a matmul with a hand-written backward) equals the einsum it replaces, value and gradients."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sftrl_jax import ops

CASES = [  # (x shape, w shape, n_in, einsum)
    ((2, 5, 8), (8, 6), 1, "BTD,DF->BTF"),
    ((2, 5, 8), (8, 3, 4), 1, "BTD,DNH->BTNH"),
    ((2, 5, 3, 4), (3, 4, 8), 2, "BTNH,NHD->BTD"),
]


@pytest.mark.parametrize("xs, ws, n_in, spec", CASES)
def test_value_and_gradients_equal_the_einsum(xs, ws, n_in, spec):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    g = jax.random.normal(kg, jnp.einsum(spec, x, w).shape)  # a random cotangent

    def ours(x, w):
        return jnp.sum(ops.dense(x, w, n_in=n_in) * g)

    def ref(x, w):
        return jnp.sum(jnp.einsum(spec, x, w) * g)

    np.testing.assert_allclose(ops.dense(x, w, n_in=n_in), jnp.einsum(spec, x, w), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_out_dtype_and_bf16_gradient_dtypes():
    x = jax.random.normal(jax.random.key(1), (4, 8), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (8, 16), jnp.bfloat16)
    y = ops.dense(x, w, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    ref = jnp.einsum("MD,DV->MV", x, w, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(y, ref, rtol=1e-6)
    dx, dw = jax.grad(lambda x, w: ops.dense(x, w, out_dtype=jnp.float32).sum(), (0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        dw.astype(jnp.float32), jnp.broadcast_to(x.astype(jnp.float32).sum(0)[:, None], (8, 16)), rtol=1e-2
    )


def test_sharded_gradients_equal_one_device():
    """Batch over 4 devices and the weight's output axis over 2: same gradients as one device."""
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    x = jax.random.normal(jax.random.key(3), (8, 6, 16))
    w = jax.random.normal(jax.random.key(4), (16, 12))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(ops.dense(x, w))), (0, 1)))
    want = grad(x, w)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None, None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    got = grad(xs, ws)
    for a, b in zip(got, want):  # dw sums 48 rows in 4 partial sums: fp32 reordering only
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_weight_gradient_avoids_the_transposed_dot_on_cpu():
    """The point of `dense`: on XLA:CPU every dot of the backward pass is a row-major matmul."""
    x = jnp.ones((64, 32))
    w = jnp.ones((32, 48))
    hlo = jax.jit(jax.grad(lambda x, w: ops.dense(x, w).sum(), (0, 1))).lower(x, w).compile().as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots, hlo
    for line in dots:  # lhs contracts its last axis (1) in every dot
        assert "lhs_contracting_dims={1}" in line, line


def test_glibc_tuning_serves_big_buffers_from_the_heap():
    """With the package imported, XLA's 64 MiB output comes from the reused heap, not a fresh mmap.

    glibc's mallinfo2().hblkhd counts the bytes of live mmap-served blocks: the live output y counts
    there without the tuning (and is page-faulted in anew on every call), not with it.
    """
    code = (
        "import sftrl_jax, ctypes, jax, jax.numpy as jnp\n"
        "class Info(ctypes.Structure):\n"
        "    _fields_ = [(n, ctypes.c_size_t) for n in 'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]\n"
        "libc = ctypes.CDLL('libc.so.6'); libc.mallinfo2.restype = Info\n"
        "x = jnp.ones((4096, 4096))\n"
        "y = jax.block_until_ready(jax.jit(lambda x: x * 2)(x))\n"
        "print(libc.mallinfo2().hblkhd)\n"
    )
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    mmapped = {}
    for flag in ("0", "1"):
        out = subprocess.run(
            [sys.executable, "-c", code], env={**env, "SFTRL_MALLOC_TUNING": flag}, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        mmapped[flag] = int(out.stdout)
    big = 4096 * 4096 * 4
    assert mmapped["0"] >= big  # the problem exists without the tuning...
    assert mmapped["1"] < big // 2  # ...and not with it

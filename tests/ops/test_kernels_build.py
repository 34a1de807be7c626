"""`sftrl_jax.kernels`: the native CPU decode kernels against the JAX ops they replace, the sampler
with and without them, bad input, and the fallback when they cannot be built."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import kernels, sampling
from sftrl_jax.models import config as config_lib
from sftrl_jax.sampling import decode
from tests.sampling.helpers import peaked_model

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_kernels = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the kernels cannot be built here")


@pytest.fixture(scope="module")
def built():
    # With a compiler on the machine the kernels must build: a failure here is a bug, not a skip.
    assert kernels.available(), kernels.error()


def _attention_case(rng, *, b, n, k, h, s):
    q = rng.standard_normal((b, n, h), np.float32)
    kc = rng.standard_normal((b, k, s, h), np.float32)
    vc = rng.standard_normal((b, k, s, h), np.float32)
    mask = rng.random((b, s)) < 0.8
    mask[0, :] = False  # a row with no key at all: a uniform average, as the masked softmax gives
    mask[1, :3] = False  # left padding
    return q, kc, vc, mask


def _attention_f64(q, k, v, mask, scale):
    """The masked softmax attention in float64 (the reference both fp32 paths are held to)."""
    b, n, h = q.shape
    kv = k.shape[1]
    s = np.einsum("bkgh,bksh->bkgs", q.astype(np.float64).reshape(b, kv, n // kv, h), k.astype(np.float64)) * scale
    s = np.where(mask[:, None, None, :], s, -1e300)
    e = np.exp(s - s.max(-1, keepdims=True))
    return (np.einsum("bkgs,bksh->bkgh", e, v.astype(np.float64)) / e.sum(-1, keepdims=True)).reshape(b, n, h)


@needs_kernels
@pytest.mark.parametrize("h", [64, 128, 16])  # the two unrolled head sizes and the generic loop
@pytest.mark.parametrize("n,k", [(8, 4), (4, 4), (8, 2)])  # G = 2, 1, 4 query heads per kv head
def test_decode_attention_is_as_exact_as_the_jax_attention(built, h, n, k):
    rng = np.random.default_rng(h + 7 * n + k)
    q, kc, vc, mask = _attention_case(rng, b=5, n=n, k=k, h=h, s=37)
    exact = _attention_f64(q, kc, vc, mask, 0.3)
    ours = np.asarray(decode._attend(jnp.asarray(q), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(mask), 0.3))
    got = np.asarray(jax.jit(lambda *a: kernels.decode_attention(*a, scale=0.3))(q, kc, vc, mask, 37))
    # fp32 rounding only: no further from float64 than the XLA ops (measured 2e-7 .. 3e-6 for both)
    assert np.abs(got - exact).max() <= max(2 * np.abs(ours - exact).max(), 1e-6)
    # only the first `filled` slots are read: NaNs after them change nothing once they are masked
    filled = 20
    mask[1:, filled:] = False
    kc[:, :, filled:], vc[:, :, filled:] = np.nan, np.nan
    got = np.asarray(kernels.decode_attention(q, kc, vc, mask, filled, scale=0.3))
    exact = _attention_f64(q[1:], np.nan_to_num(kc[1:]), np.nan_to_num(vc[1:]), mask[1:], 0.3)
    assert np.isfinite(got).all()
    assert np.abs(got[1:] - exact).max() <= 5e-6


@needs_kernels
@pytest.mark.parametrize("b", [1, 5, 16, 24, 33])
@pytest.mark.parametrize("o,i", [(1024, 512), (37, 19), (6, 1536)])
def test_skinny_matmul_equals_the_matmul(built, b, o, i):
    rng = np.random.default_rng(b * o + i)
    w = rng.standard_normal((o, i), np.float32)
    x = rng.standard_normal((b, i), np.float32)
    exact = w.astype(np.float64) @ x.astype(np.float64).T
    tol = 4 * np.finfo(np.float32).eps * np.abs(w).astype(np.float64) @ np.abs(x).astype(np.float64).T * np.sqrt(i)
    for got in (
        kernels.skinny_matmul(w, x),
        jax.jit(kernels.skinny_matmul, static_argnames="x_transposed")(w, x.T, x_transposed=True),
    ):
        assert got.shape == (o, b)
        assert (np.abs(np.asarray(got, np.float64) - exact) <= tol).all()


@needs_kernels
def test_kernels_refuse_bad_input(built):
    w = np.ones((8, 4), np.float32)
    with pytest.raises(TypeError, match="w must be a 2-D float32"):
        kernels.skinny_matmul(w.astype(np.float16), np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"w \(8, 4\) is \[O, I\] but x \(2, 5\)"):
        kernels.skinny_matmul(w, np.ones((2, 5), np.float32))
    q, kc, vc, mask = _attention_case(np.random.default_rng(0), b=2, n=4, k=2, h=16, s=5)
    with pytest.raises(TypeError, match="k must be float32"):
        kernels.decode_attention(q, kc.astype(np.float16), vc, mask, 5, scale=1.0)
    with pytest.raises(ValueError, match=r"mask \(2, 4\) is not \[B, S\]"):
        kernels.decode_attention(q, kc, vc, mask[:, :4], 5, scale=1.0)


@needs_kernels
@pytest.mark.parametrize("head_dim,rows", [(16, 3), (64, 3), (16, 40)])  # 40 rows: XLA's matmul, kernel attention
def test_sampler_with_kernels_equals_the_jax_decode(built, monkeypatch, head_dim, rows):
    model = peaked_model(config_lib.LlamaConfig.tiny(head_dim=head_dim), seed=3)
    rng = np.random.default_rng(rows)
    prompts = [[1, *rng.integers(3, 256, size=int(rng.integers(1, 12))).tolist()] for _ in range(rows)]
    assert decode.use_kernel(model, devices=1)
    kw = dict(max_new_tokens=12, temperature=0.7, top_k=8, seed=4, stop_tokens=())
    with_kernels = sampling.generate(model, prompts, **kw)
    monkeypatch.setattr(decode, "use_kernel", lambda *a, **k: False)
    without = sampling.generate(model, prompts, **kw)
    np.testing.assert_array_equal(with_kernels.tokens, without.tokens)
    np.testing.assert_allclose(with_kernels.logprobs_temperature, without.logprobs_temperature, atol=1e-5)
    assert sampling.logprob_gap(model, prompts, with_kernels) < 1e-5


def test_kernels_fall_back_when_they_cannot_be_built(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SFTRL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not kernels.available()
    assert "no C++ compiler" in kernels.error() and "no-such-compiler" in kernels.error()
    model = peaked_model(config_lib.LlamaConfig.tiny(), seed=3)
    assert not decode.use_kernel(model, devices=1)
    result = sampling.generate(model, [[1, 5, 9]], max_new_tokens=4, temperature=0.0)
    assert result.tokens.shape == (1, 4)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SFTRL_CPU_KERNELS", "0")
    assert not kernels.available() and kernels.error() is None


@needs_kernels
def test_kernels_build_into_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("SFTRL_KERNEL_CACHE", str(tmp_path))
    assert kernels.available(), kernels.error()
    built_files = list(tmp_path.glob("cpu_kernels-*.so"))
    assert len(built_files) == 1 and kernels._state["path"] == built_files[0]
    stamp = built_files[0].stat().st_mtime_ns
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.available()
    assert list(tmp_path.glob("*")) == built_files and built_files[0].stat().st_mtime_ns == stamp

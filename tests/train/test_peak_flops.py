"""`train.metrics.peak_flops`, the denominator of MFU: the best matmul this device runs."""

import time

import jax
import jax.numpy as jnp
import pytest

from sftrl_jax import kernels
from sftrl_jax.train import metrics


def test_peak_is_cached_and_not_below_the_products_the_steps_run(monkeypatch):
    monkeypatch.setattr(metrics, "_PEAK", {})
    n = 512
    peak = metrics.peak_flops(n=n, repeats=3)
    assert peak > 1e8 and metrics.peak_flops(n=n, repeats=3) == peak  # cached per size and dtype
    if not kernels.gemm_available():
        pytest.skip("no OpenBLAS gemm kernel here")
    # The OpenBLAS product is one of the candidates: a peak from XLA's dot alone came out below the
    # rate of the kernel the steps use (MFU above 100%). The peak is the best of its candidates, so
    # the kernel's best time, measured again now, is at most ~the peak's time (2x margin for noise).
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: kernels.gemm(x, x))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    assert 2.0 * n**3 / best < 2.0 * peak
    calls = []
    monkeypatch.setattr(metrics, "_PEAK", {})
    monkeypatch.setattr(kernels, "gemm", lambda x, y: calls.append(x.shape) or x @ y)
    metrics.peak_flops(n=64, repeats=1)
    assert calls  # the kernel is timed for fp32 on CPU
    calls.clear()
    metrics.peak_flops(n=64, repeats=1, dtype="bfloat16")
    assert not calls  # and only for fp32

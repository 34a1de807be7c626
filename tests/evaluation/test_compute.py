"""The paper's compute accounting against hand-computed values."""

import pytest

from sftrl_jax.evaluation import compute


def test_formulas_hand_computed():
    N = 10_000_000_000
    assert compute.sft_flops(N, 1_000, 500) == 6 * N * 1_500
    # GP: lambda 6 -> 6N(1000+200) + 2N*1200
    assert compute.rl_flops(N, 1_000, 200, lam=compute.LAMBDA["gp"]) == 6 * N * 1_200 + 2 * N * 1_200
    assert compute.rl_flops(N, 0, 10, lam=5.1) == pytest.approx(6 * N * 10 + 2 * N * 51)
    with pytest.raises(ValueError, match="needs lam"):
        compute.rl_flops(N, 0, 10)


def test_counter_small_case():
    c = compute.ComputeCounter(n_params=100, d_init=50)
    c.add_generation(prompt_tokens=30, generated_tokens=10)
    c.add_generation(prompt_tokens=40, generated_tokens=5)
    c.add_train(45, n_images=1)
    c.add_train(35)
    assert (c.trained_tokens, c.buffer_tokens) == (80, 85)
    assert c.reference_tokens == 30 + 40 + 6 * (45 + 1600) + 6 * 35
    assert c.flops(rl=True) == 6 * 100 * (50 + 80) + 2 * 100 * 85
    assert c.flops(rl=False) == 6 * 100 * (50 + 80)
    assert compute.ComputeCounter.from_state(c.state()) == c

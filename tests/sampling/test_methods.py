"""Token choice on a known distribution: greedy, top-k, top-p never leave the kept set, sample
frequencies match the renormalised probabilities, and the three log-probs follow their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax.sampling import methods

PROBS = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.04, 0.01])
LOGITS = np.log(PROBS).astype(np.float32) + 3.0  # an offset changes nothing
N = 20_000


def _draw(method, n=N, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, len(LOGITS)))
    keys = methods.row_keys(jax.random.key(seed), jnp.int32(1), jnp.arange(n))
    return jax.jit(methods.choose, static_argnums=2)(logits, keys, method)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, kept",
    [
        (1.0, 3, 1.0, [0, 1, 2]),
        (1.0, 0, 0.7, [0, 1, 2, 3]),  # mass ranked above token 3 is 0.65 < 0.7, above token 4 0.77
        (1.0, 2, 0.5, [0]),  # top-p on the top-k renormalised [0.6, 0.4]
        (0.5, 4, 1.0, [0, 1, 2, 3]),
    ],
)
def test_samples_stay_in_the_kept_set_with_the_renormalised_frequencies(temperature, top_k, top_p, kept):
    choice = _draw(methods.Method(temperature=temperature, top_k=top_k, top_p=top_p))
    tokens = np.asarray(choice.token)
    assert set(np.unique(tokens)) <= set(kept)
    p_t = PROBS ** (1 / temperature) / np.sum(PROBS ** (1 / temperature))
    target = np.zeros_like(p_t)
    target[kept] = p_t[kept] / p_t[kept].sum()
    freq = np.bincount(tokens, minlength=len(PROBS)) / N
    # 5 standard errors of a binomial frequency
    assert np.all(np.abs(freq - target) <= 5 * np.sqrt(target * (1 - target) / N) + 1e-9), (freq, target)
    np.testing.assert_allclose(choice.processed, np.log(target[tokens]), atol=1e-5)
    np.testing.assert_allclose(choice.temperature, np.log(p_t[tokens]), atol=1e-5)
    np.testing.assert_allclose(choice.raw, np.log(PROBS[tokens]), atol=1e-5)


def test_greedy_is_the_argmax_with_raw_logprobs():
    choice = _draw(methods.Method(temperature=0.0), n=4)
    assert np.all(np.asarray(choice.token) == 0)
    np.testing.assert_allclose(choice.raw, np.log(0.30), atol=1e-6)
    np.testing.assert_allclose(choice.temperature, choice.raw)
    np.testing.assert_array_equal(choice.processed, 0.0)


def test_ties_at_the_kth_value_are_kept():
    scaled = jnp.asarray([[3.0, 2.0, 2.0, 1.0]])
    np.testing.assert_array_equal(methods.kept(scaled, top_k=2, top_p=1.0), [[True, True, True, False]])
    assert methods.kept(scaled, top_k=0, top_p=1.0) is None


def test_draws_depend_on_the_row_key_only():
    a = _draw(methods.Method(temperature=1.0), n=64, seed=3)
    b = _draw(methods.Method(temperature=1.0), n=64, seed=3)
    c = _draw(methods.Method(temperature=1.0), n=64, seed=4)
    np.testing.assert_array_equal(a.token, b.token)
    assert np.any(np.asarray(a.token) != np.asarray(c.token))
    # the first 16 rows of a 64-row draw equal a 16-row draw: padding a batch changes no row
    np.testing.assert_array_equal(_draw(methods.Method(temperature=1.0), n=16, seed=3).token, a.token[:16])

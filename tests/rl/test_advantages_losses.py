"""GAE, group advantages and the PPO / GRPO losses against hand-computed values and numpy references."""

import numpy as np
import pytest

from sftrl_jax.rl import advantages, losses, ppo


def gae_reference(rewards, values, dones, last_value, gamma, lam):
    """A plain loop in RL4VLM's storage style: masks[t+1] = 1 - done[t]."""
    T = len(rewards)
    adv = np.zeros_like(rewards, dtype=np.float64)
    gae = np.zeros_like(last_value, dtype=np.float64)
    for t in reversed(range(T)):
        next_v = last_value if t == T - 1 else values[t + 1]
        nd = 1.0 - dones[t]
        delta = rewards[t] + gamma * next_v * nd - values[t]
        gae = delta + gamma * lam * nd * gae
        adv[t] = gae
    return adv, adv + values


def test_gae_hand_computed_two_turns():
    # One env, episode: turn 0 (r=-1), turn 1 (r=5, done). gamma .9, lambda .95.
    r, v, d = np.array([[-1.0], [5.0]]), np.array([[0.5], [2.0]]), np.array([[0.0], [1.0]])
    adv, ret = advantages.gae(r, v, d, np.array([100.0]), gamma=0.9, lam=0.95)
    a1 = 5.0 - 2.0  # terminal: no bootstrap from last_value
    a0 = (-1.0 + 0.9 * 2.0 - 0.5) + 0.9 * 0.95 * a1
    np.testing.assert_allclose(np.asarray(adv)[:, 0], [a0, a1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[:, 0], [a0 + 0.5, a1 + 2.0], rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_numpy_reference_with_truncations_and_one_turn_episodes(seed):
    rng = np.random.default_rng(seed)
    T, E = 12, 5
    r = rng.normal(size=(T, E))
    v = rng.normal(size=(T, E))
    d = (rng.random((T, E)) < 0.35).astype(np.float64)
    d[3, :] = 1.0
    d[4, :] = 1.0  # a one-turn episode at t=4 in every env
    last = rng.normal(size=E)
    adv, ret = advantages.gae(r, v, d, last, gamma=0.9, lam=0.95)
    ref_adv, ref_ret = gae_reference(r, v, d, last, 0.9, 0.95)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(adv)[4], r[4] - v[4], rtol=1e-5, atol=1e-6)  # one-turn: A = r - V


def test_group_advantages():
    r = np.array([[5.0, -1.0, -1.0, -3.0], [1.0, 1.0, 1.0, 1.0]])
    a = np.asarray(advantages.group_advantages(r))
    mean, std = r[0].mean(), r[0].std()
    np.testing.assert_allclose(a[0], (r[0] - mean) / (std + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(a[1], 0.0)  # all-equal group: no signal
    np.testing.assert_allclose(np.asarray(advantages.group_advantages(r, std_normalize=False))[0], r[0] - mean)


def test_normalize_with_mask():
    x = np.array([1.0, 2.0, 3.0, 100.0])
    out = np.asarray(advantages.normalize(x, np.array([1, 1, 1, 0])))
    np.testing.assert_allclose(out[:3], (x[:3] - 2.0) / (np.std(x[:3]) + 1e-5), rtol=1e-6)
    assert out[3] == 0.0


def test_ppo_policy_loss_hand_computed():
    logp, old = np.log(np.array([1.2, 0.8, 1.0])), np.zeros(3)
    adv = np.array([1.0, 1.0, -2.0])
    loss, aux = losses.ppo_policy_loss(logp, old, adv, clip=0.1)
    # ratio 1.2 (A>0 -> clipped to 1.1), 0.8 (A>0 -> min(0.8, 0.9)=0.8), 1.0 (A<0 -> -2)
    expected = -np.mean([1.1 * 1.0, 0.8 * 1.0, -2.0])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(aux["clip_frac"]) == pytest.approx(2 / 3)
    ratio = np.array([1.2, 0.8, 1.0])
    assert float(aux["approx_kl"]) == pytest.approx(np.mean(ratio - 1 - np.log(ratio)), rel=1e-5)
    # ratio == 1 everywhere (first epoch): loss = -mean(A), no clipping
    loss1, aux1 = losses.ppo_policy_loss(old, old, adv, clip=0.1)
    assert float(loss1) == pytest.approx(-adv.mean()) and float(aux1["clip_frac"]) == 0.0


def test_ppo_uses_clipped_surrogate_alone_when_a_ratio_explodes():
    logp, old, adv = np.log(np.array([20.0, 0.5])), np.zeros(2), np.array([-1.0, 1.0])
    loss, _ = losses.ppo_policy_loss(logp, old, adv, clip=0.1, max_ratio=10.0)
    assert float(loss) == pytest.approx(-np.mean([1.1 * -1.0, 0.9 * 1.0]), rel=1e-6)


def test_value_loss_clipped():
    v, old, ret = np.array([1.0, 0.0]), np.array([0.5, 0.0]), np.array([2.0, 0.3])
    loss, _ = losses.value_loss(v, old, ret, clip=0.1)
    # row 0: unclipped (1-2)^2=1, clipped (0.6-2)^2=1.96 -> 1.96; row 1: (0-0.3)^2 both
    assert float(loss) == pytest.approx(0.5 * np.mean([1.96, 0.09]), rel=1e-6)
    assert ppo.explained_variance(ret, ret) == 1.0


def test_grpo_loss_aggregations_and_kl():
    logp = np.log(np.array([[1.0, 1.0, 1.0], [1.5, 1.0, 1.0]]))
    old = np.zeros((2, 3))
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    adv = np.array([1.0, -1.0])
    per = -np.minimum(np.exp(logp) * adv[:, None], np.clip(np.exp(logp), 0.8, 1.2) * adv[:, None])
    tok, _ = losses.grpo_loss(logp, old, adv, mask, clip=0.2, aggregation="token_mean")
    assert float(tok) == pytest.approx((per * mask).sum() / mask.sum(), rel=1e-6)
    seq, _ = losses.grpo_loss(logp, old, adv, mask, clip=0.2, aggregation="seq_mean")
    assert float(seq) == pytest.approx(np.mean((per * mask).sum(1) / mask.sum(1)), rel=1e-6)
    dr, _ = losses.grpo_loss(logp, old, adv, mask, clip=0.2, aggregation="seq_sum_norm", max_tokens=4)
    assert float(dr) == pytest.approx((per * mask).sum() / (2 * 4), rel=1e-6)
    kl = np.asarray(losses.kl_k3(np.log([0.5, 0.2]), np.log([0.2, 0.5])))
    assert np.all(kl >= 0) and kl[0] == pytest.approx(0.4 - np.log(0.4) - 1, rel=1e-5)
    with_kl, aux = losses.grpo_loss(logp, old, adv, mask, ref_logp=old, kl_coef=0.1)
    assert float(with_kl) > float(tok) and float(aux["ref_kl"]) > 0
    with pytest.raises(ValueError, match="unknown aggregation"):
        losses.grpo_loss(logp, old, adv, mask, aggregation="bogus")


def test_reference_kl_ignores_overflow_off_the_response():
    """Off the response the batch's reference log-prob is 0 and the policy's can be far below -88 at a
    low temperature: exp(ref - logp) is inf there. Loss, metric and gradients must stay finite and
    equal those of the response tokens alone."""
    import jax
    import jax.numpy as jnp

    logp = jnp.array([[-300.0, -0.5, -1.0, -200.0]])  # context, response, response, padding
    ref = jnp.array([[0.0, -0.7, -0.9, 0.0]])
    mask = jnp.array([[0.0, 1.0, 1.0, 0.0]])
    kl = np.asarray(losses.kl_k3(logp, ref, mask))
    assert kl[0, 0] == 0.0 and kl[0, 3] == 0.0
    np.testing.assert_allclose(kl[0, 1:3], [np.exp(-0.2) + 0.2 - 1, np.exp(0.1) - 0.1 - 1], rtol=1e-5)
    assert np.isinf(np.asarray(losses.kl_k3(logp, ref))[0, 0])  # unmasked: the overflow the mask prevents

    def loss(lp):
        out, aux = losses.grpo_loss(lp, ref, jnp.array([1.0]), mask, ref_logp=ref, kl_coef=0.1)
        return out, aux["ref_kl"]

    (value, ref_kl), grad = jax.value_and_grad(loss, has_aux=True)(logp)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
    assert float(ref_kl) == pytest.approx(kl[0, 1:3].mean(), rel=1e-5)
    assert np.asarray(grad)[0, 0] == 0.0 and np.asarray(grad)[0, 3] == 0.0

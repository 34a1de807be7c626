"""Advantage estimators: GAE (PPO, turn-level) and group-normalised advantages (GRPO).

Shapes: a rollout buffer is [T, E] (T turns per env, E parallel envs), as in RL4VLM's storage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(
    rewards: jax.Array,
    values: jax.Array,
    dones: jax.Array,
    last_value: jax.Array,
    *,
    gamma: float = 0.9,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over a [T, E] buffer.

        delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t
        A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1}
        R_t     = A_t + V_t                                  (the value target)

    `dones[t]` is 1 when the episode ended at turn t (terminated *or* truncated: the paper uses
    `use_proper_time_limits=False`, so truncation is treated as terminal); `last_value` [E] is V of
    the state after the last turn. Paper values: gamma 0.9, lambda 0.95. Returns (advantages, returns).
    """
    rewards, values, dones = (jnp.asarray(x, jnp.float32) for x in (rewards, values, dones))
    next_values = jnp.concatenate([values[1:], jnp.asarray(last_value, jnp.float32)[None]], axis=0)
    not_done = 1.0 - dones
    deltas = rewards + gamma * next_values * not_done - values

    def step(carry, x):
        delta, nd = x
        adv = delta + gamma * lam * nd * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(last_value, jnp.float32), (deltas, not_done), reverse=True)
    return adv, adv + values


def normalize(x: jax.Array, mask: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
    """(x - mean) / (std + eps) over the entries where `mask` is 1 (all when None)."""
    x = jnp.asarray(x, jnp.float32)
    if mask is None:
        return (x - x.mean()) / (x.std() + eps)
    mask = jnp.asarray(mask, jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    mean = (x * mask).sum() / n
    std = jnp.sqrt((((x - mean) ** 2) * mask).sum() / n)
    return (x - mean) / (std + eps) * mask


def group_advantages(rewards: jax.Array, *, std_normalize: bool = True, eps: float = 1e-6) -> jax.Array:
    """GRPO: rewards [P, G] (G samples of each of P prompts) -> advantages [P, G].

        A_{p,g} = (r_{p,g} - mean_g r_{p,.}) / (std_g r_{p,.} + eps)      (std_normalize)
        A_{p,g} =  r_{p,g} - mean_g r_{p,.}                               (otherwise; Dr. GRPO)

    A group whose rewards are all equal gets advantage 0 (it carries no signal).
    """
    r = jnp.asarray(rewards, jnp.float32)
    centered = r - r.mean(axis=-1, keepdims=True)
    if not std_normalize:
        return centered
    return centered / (r.std(axis=-1, keepdims=True) + eps)

"""RL losses: small pure functions over arrays, fp32, returning (loss, aux).

Symbols: `logp` log pi_theta(a|s) now, `old_logp` at rollout time, `ratio` = exp(logp - old_logp),
epsilon = `clip`. PPO acts on whole turns (one action = one response, RL4VLM); GRPO on tokens.
`sampler_logp`: the sampler's log-probs of the same tokens, which differ from the trainer's at the
same parameters by rounding (bf16, other kernels); `is_weight` the truncated importance weight
min(pi_old / pi_sampler, C) that corrects the policy-gradient term for it (TIS).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of x over the positions where mask is 1 (0 when there are none); no mask: over all."""
    if mask is None:
        return x.mean()
    mask = mask.astype(jnp.float32)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def ppo_policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    clip: float = 0.1,
    max_ratio: float | None = 10.0,
    mask: jax.Array | None = None,
    is_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate  L = -E[w * min(ratio * A, clip(ratio, 1-eps, 1+eps) * A)].

    As in the reference (RL4VLM): when some ratio exceeds `max_ratio` (10) the clipped surrogate
    alone is used for the whole batch. w = `is_weight` (default 1): the truncated importance weight
    of each sample (`truncated_is_weight`). Aux: ratio stats, clip fraction, approx KL (k3
    estimator, E[(ratio - 1) - log ratio]).
    """
    logp, old_logp, advantages = (jnp.asarray(x, jnp.float32) for x in (logp, old_logp, advantages))
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
    per = -jnp.minimum(surr1, surr2)
    if max_ratio is not None:
        too_big = (
            jnp.any(jnp.where(mask.astype(bool), ratio, 0.0) > max_ratio)
            if mask is not None
            else jnp.any(ratio > max_ratio)
        )
        per = jnp.where(too_big, -surr2, per)
    if is_weight is not None:
        per = per * jax.lax.stop_gradient(jnp.asarray(is_weight, jnp.float32))
    loss = masked_mean(per, mask)
    aux = {
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": jnp.max(jnp.where(mask.astype(bool), ratio, -jnp.inf)) if mask is not None else ratio.max(),
        "clip_frac": masked_mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32), mask),
        "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
    }
    return loss, aux


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    *,
    clip: float | None = 0.1,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """0.5 * E[max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)]  (unclipped when clip is None)."""
    values, old_values, returns = (jnp.asarray(x, jnp.float32) for x in (values, old_values, returns))
    unclipped = (values - returns) ** 2
    if clip is None:
        per = unclipped
    else:
        v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
        per = jnp.maximum(unclipped, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(per, mask), {"value_mean": masked_mean(values, mask)}


def kl_k3(logp: jax.Array, ref_logp: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Per-token k3 estimator of KL(pi || pi_ref):  exp(ref - logp) - (ref - logp) - 1  (>= 0).

    `mask` (1 on the tokens that count): the difference is set to 0 elsewhere *before* the exp. Batches
    carry 0 as the reference log-prob off the response, where the policy's log-prob of a context
    token divided by a low temperature can be below -88: exp(ref - logp) overflows to inf, and inf x 0
    in a masked mean (or its gradient) is NaN. Measured: PPO with kl_coef 0.1 at temperature 0.2 (the
    paper's) on the tiny GP-L model stopped after 3 updates of non-finite gradients."""
    d = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    if mask is not None:
        d = jnp.where(mask > 0, d, 0.0)
    return jnp.exp(d) - d - 1.0


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    ref_logp: jax.Array | None = None,
    kl_coef: float = 0.0,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
    is_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level clipped objective with a per-sequence advantage broadcast over tokens.

    logp, old_logp, mask, is_weight: [B, L]; advantages: [B]. Per token:
        l_t = -w_t * min(ratio_t * A, clip(ratio_t, 1-eps, 1+eps_high) * A) + beta * KL_k3(t)
    with w_t = `is_weight` (default 1), the truncated importance weight (`truncated_is_weight`).
    Aggregation (how tokens are averaged):
        "token_mean"  sum over all tokens / number of tokens in the batch (DAPO)
        "seq_mean"    mean over each sequence's tokens, then over sequences (original GRPO)
        "seq_sum_norm" sum over tokens / (B * max_tokens) (Dr. GRPO; max_tokens = L by default)
    """
    logp, old_logp = jnp.asarray(logp, jnp.float32), jnp.asarray(old_logp, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    adv = jnp.asarray(advantages, jnp.float32)[:, None]
    log_ratio = logp - old_logp
    ratio = jnp.exp(log_ratio)
    hi = clip if clip_high is None else clip_high
    per = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip, 1.0 + hi) * adv)
    if is_weight is not None:
        per = per * jax.lax.stop_gradient(jnp.asarray(is_weight, jnp.float32))
    kl = None
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp, mask)
        per = per + kl_coef * kl
    if aggregation == "token_mean":
        loss = (per * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    elif aggregation == "seq_mean":
        seq = (per * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        loss = seq.mean()
    elif aggregation == "seq_sum_norm":
        L = max_tokens if max_tokens is not None else per.shape[-1]
        loss = (per * mask).sum() / (per.shape[0] * L)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; use token_mean, seq_mean or seq_sum_norm")
    aux = {
        "clip_frac": masked_mean(((ratio < 1.0 - clip) | (ratio > 1.0 + hi)).astype(jnp.float32), mask),
        "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    if kl is not None:
        aux["ref_kl"] = masked_mean(kl, mask)
    return loss, aux


def truncated_is_weight(
    log_is_ratio: jax.Array, cap: float, mask: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Truncated importance sampling (TIS):  w = min(exp(log pi_old - log pi_sampler), C).

    `log_is_ratio`: the trainer's old log-probs minus the sampler's, per token (GRPO, [B, L]) or per
    turn (PPO, [B]: the weighted token sum, as `turn_logp`). The samples were drawn from the sampler,
    not from the trainer's pi_old; w reweights them, capped at C = `cap` so that a token the sampler
    under-rates cannot dominate the step. No gradient flows through w. Aux (over `mask`): the mean
    of w and the fraction capped.
    """
    raw = jnp.exp(jnp.asarray(log_is_ratio, jnp.float32))
    w = jax.lax.stop_gradient(jnp.minimum(raw, cap))
    return w, {
        "tis_weight_mean": masked_mean(w, mask),
        "tis_capped_frac": masked_mean((raw > cap).astype(jnp.float32), mask),
    }


def sampler_agreement(
    trainer_logp: jax.Array, sampler_logp: jax.Array, *, band: tuple[float, float] = (0.9, 1.1)
) -> dict[str, jax.Array]:
    """How far the sampler's token log-probs are from the trainer's at the same parameters.

    trainer_logp, sampler_logp: [N], the real response tokens of an update. `sampler_mismatch_frac`:
    the fraction with exp(trainer - sampler) outside `band` ([0.9, 1.1]: trl#6789 measured 7.5% of
    a bf16 run's tokens outside it); `sampler_abs_log_ratio`: mean |trainer - sampler|. Both 0 when
    the two compute the same numbers.
    """
    log_ratio = jnp.asarray(trainer_logp, jnp.float32) - jnp.asarray(sampler_logp, jnp.float32)
    ratio = jnp.exp(log_ratio)
    n = max(log_ratio.size, 1)
    outside = ((ratio < band[0]) | (ratio > band[1])).sum() / n
    return {"sampler_mismatch_frac": outside, "sampler_abs_log_ratio": jnp.abs(log_ratio).sum() / n}

"""GRPO: G sampled episodes per prompt, group-normalised advantages, token-level clipped objective.

For multi-turn episodes (sequential revision) every turn of an episode carries the episode's
advantage: A = (R - mean_group R) / (std_group R + eps) with R the episode return (sum of its turn
rewards, or success in {0, 1} with `return_mode="success"`). No value head. Optional KL to a frozen
reference policy through the k3 estimator (`kl_coef` beta). Loss aggregation: see `losses.grpo_loss`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sftrl_jax.config import ConfigError
from sftrl_jax.rl import losses
from sftrl_jax.rl.advantages import group_advantages
from sftrl_jax.rl.rollout import Turn
from sftrl_jax.sft.losses import token_logprobs

IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyper-parameters (G = `group_size`, epsilon = `clip`, beta = `kl_coef`)."""

    group_size: int = 8  # G: episodes per prompt (same dealt hand / route)
    clip: float = 0.2
    clip_high: float | None = None  # asymmetric upper clip (DAPO); None = `clip`
    kl_coef: float = 0.0  # beta; > 0: `sftrl rl` keeps the starting policy (model.init) as the frozen reference
    aggregation: str = "token_mean"  # token_mean | seq_mean | seq_sum_norm
    std_normalize: bool = True  # False: Dr. GRPO (centred rewards only)
    return_mode: str = "sum"  # "sum" of turn rewards or "success" (1 if the episode succeeded)
    epochs: int = 1
    samples_per_step: int = 64  # turns per optimiser step
    micro_batch: int = 8
    temperature: float = 1.0
    # Where the ratio's old token log-probs come from: "sampler" = the sampler's log-probs (no extra
    # forward); "trainer" = one forward of the training function over the rollout before the first
    # step, each turn in that step's batch layout: the first step's ratio is exactly 1 in the tests'
    # settings, not always on trained models (XLA may round the update's own forward differently).
    old_logp: str = "sampler"

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError(
                f"grpo.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        if self.kl_coef < 0:
            raise ConfigError(f"grpo.kl_coef must be >= 0, got {self.kl_coef}")
        if self.aggregation not in ("token_mean", "seq_mean", "seq_sum_norm"):
            raise ConfigError(
                f"grpo.aggregation must be token_mean, seq_mean or seq_sum_norm, got {self.aggregation!r}"
            )
        if self.return_mode not in ("sum", "success"):
            raise ConfigError(f"grpo.return_mode must be 'sum' or 'success', got {self.return_mode!r}")
        if self.samples_per_step % self.micro_batch:
            raise ConfigError("grpo.samples_per_step must be a multiple of grpo.micro_batch")
        if self.old_logp not in ("trainer", "sampler"):
            raise ConfigError(f"grpo.old_logp must be 'trainer' or 'sampler', got {self.old_logp!r}")


def episode_advantages(episodes: Sequence[Sequence[Turn]], groups: Sequence[int], cfg: GRPOConfig) -> np.ndarray:
    """Per-episode advantages: `groups[i]` is the group (prompt) index of episode i; each group has
    exactly G episodes. Returns [n_episodes]."""
    if cfg.return_mode == "sum":
        returns = np.array([sum(t.reward for t in ep) for ep in episodes], np.float32)
    else:
        returns = np.array([float(any(t.solved for t in ep)) for ep in episodes], np.float32)
    groups = np.asarray(groups)
    order = np.argsort(groups, kind="stable")
    G = cfg.group_size
    if len(order) % G or np.any(np.bincount(groups) % G):
        raise ValueError(f"every group needs exactly {G} episodes; got group sizes {np.bincount(groups).tolist()}")
    adv_sorted = np.asarray(group_advantages(returns[order].reshape(-1, G), std_normalize=cfg.std_normalize)).reshape(
        -1
    )
    adv = np.empty_like(adv_sorted)
    adv[order] = adv_sorted
    return adv


def _token_logp(model, mb, temperature: float) -> jax.Array:
    inputs = {k: mb[k] for k in IMAGE_KEYS if k in mb}
    out = model(mb["input_ids"], attention_mask=mb["attention_mask"], **inputs)
    return token_logprobs(out.logits.astype(jnp.float32) / temperature, mb["targets"])


def make_logp_fn(graphdef, rest, temperature: float):
    """(params, batch) -> token log-probs [B, L] of the targets (logits / temperature), no gradients:
    the loss's own forward, for the old log-probs of `GRPOConfig.old_logp` = "trainer"."""

    def logp_fn(params, batch):
        return _token_logp(nnx.merge(graphdef, params, rest), batch, temperature)

    return logp_fn


def make_update_step(graphdef, rest, tx: optax.GradientTransformation, cfg: GRPOConfig, *, lr_fn):
    """Pure GRPO optimiser step; batch = `ppo.build_batch` arrays + `advantages` [B]
    (+ `ref_token_logp` [B, L] when kl_coef > 0)."""
    n_micro = cfg.samples_per_step // cfg.micro_batch

    def loss_fn(params, mb):
        logp = _token_logp(nnx.merge(graphdef, params, rest), mb, cfg.temperature)
        loss, aux = losses.grpo_loss(
            logp,
            mb["old_token_logp"],
            mb["advantages"],
            mb["resp_mask"],
            clip=cfg.clip,
            clip_high=cfg.clip_high,
            ref_logp=mb.get("ref_token_logp"),
            kl_coef=cfg.kl_coef,
            aggregation=cfg.aggregation,
        )
        gap = jnp.abs((logp - mb["old_token_logp"]) * mb["resp_mask"]).max()
        return loss, {"loss": loss, **aux, "logprob_gap_max": gap}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state, batch):
        if cfg.kl_coef > 0 and "ref_token_logp" not in batch:
            raise ValueError(
                f"grpo.kl_coef = {cfg.kl_coef} needs the reference's token log-probs in the batch (ref_token_logp)"
            )
        micro = jax.tree.map(lambda x: x.reshape(n_micro, cfg.micro_batch, *x.shape[1:]), batch)

        def accumulate(grads, mb):
            (_, aux), g = grad_fn(state.params, mb)
            return jax.tree.map(jnp.add, grads, g), aux

        grads, aux = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, state.params), micro)
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: (v.max() if k.endswith("_max") else v.mean()) for k, v in aux.items()}
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            update_norm=optax.tree.norm(updates),
            lr=lr_fn(state.step),
            finite=jnp.isfinite(optax.tree.norm(grads)),
        )
        return dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state), metrics

    return update

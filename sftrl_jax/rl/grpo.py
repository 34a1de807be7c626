"""GRPO: G sampled episodes per prompt, group-normalised advantages, token-level clipped objective.

For multi-turn episodes (sequential revision) every turn of an episode carries the episode's
advantage: A = (R - mean_group R) / (std_group R + eps) with R the episode return (sum of its turn
rewards, or success in {0, 1} with `return_mode="success"`). No value head. Optional KL to a frozen
reference policy through the k3 estimator (`kl_coef` beta). Loss aggregation: see `losses.grpo_loss`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sftrl_jax import episodes
from sftrl_jax.config import ConfigError, check_ranges
from sftrl_jax.episodes import Turn
from sftrl_jax.models import logprobs
from sftrl_jax.rl import batching, losses
from sftrl_jax.rl import learner as learner_lib
from sftrl_jax.rl.advantages import group_advantages


@dataclasses.dataclass(frozen=True)
class GRPOConfig(learner_lib.AlgoConfig):
    """GRPO hyper-parameters (G = `group_size`, epsilon = `clip`, beta = `kl_coef`, C = `tis_cap`).

    `old_logp`, the ratio's old token log-probs: "auto" (the default) takes the trainer's (the
    no-gradient pass of the training forward over the rollout's turns, `make_logp_fn`) where they
    differ from the sampler's by design: a compute dtype below fp32 (`model.dtype` bfloat16, where
    trl#6789 measured 7.5% of tokens with a trainer/sampler ratio outside [0.9, 1.1], and the
    ratio against the sampler's would clip them from the first step) or `tis_cap` on; in fp32 the
    sampler's (they agree to ~1e-5, and earlier fp32 runs keep their numbers). "trainer" or
    "sampler" force one. The trainer's pass runs every update whatever the choice: it measures the
    agreement (`sampler_mismatch_frac`, `sampler_abs_log_ratio`), one forward over the update's turns.
    `tis_cap` C > 0: each token's policy term weighted by min(pi_old_t / pi_sampler_t, C) (TIS).
    """

    NAME: ClassVar[str] = "grpo"
    group_size: int = 8  # G: episodes per prompt (same dealt hand / route)
    clip: float = 0.2
    clip_high: float | None = None  # asymmetric upper clip (DAPO); None = `clip`
    aggregation: str = "token_mean"  # token_mean | seq_mean | seq_sum_norm
    std_normalize: bool = True  # False: Dr. GRPO (centred rewards only)
    return_mode: str = "sum"  # "sum" of turn rewards or "success" (1 if the episode succeeded)
    old_logp: str = "auto"

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError(
                f"grpo.group_size must be >= 2 (advantages are relative to the group), got {self.group_size}"
            )
        super().__post_init__()
        check_ranges(self, clip="(0, inf)", clip_high="(0, inf)")
        self.choice("aggregation", ("token_mean", "seq_mean", "seq_sum_norm"))
        self.choice("return_mode", ("sum", "success"))

    def steps_per_update(self, run_cfg) -> int:
        """Optimiser steps per update: an estimate for the schedule (episodes vary in turns)."""
        return self.epochs * max(1, run_cfg.train.prompts_per_update * self.group_size // self.samples_per_step)


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
    return logprobs.forward(model, mb, temperature=temperature)["logp"]


def make_logp_fn(graphdef, rest, temperature: float):
    """(params, batch) -> token log-probs [B, L] of the targets (logits / temperature), no gradients:
    the loss's own forward: the trainer-sampler agreement every update, and the old log-probs of
    `GRPOConfig.old_logp` "trainer"."""

    def logp_fn(params, batch):
        return _token_logp(nnx.merge(graphdef, params, rest), batch, temperature)

    return logp_fn


def make_update_step(graphdef, rest, tx: optax.GradientTransformation, cfg: GRPOConfig, *, lr_fn, temperature: float):
    """Pure GRPO optimiser step; batch = `batching.build_batch` arrays + `advantages` [B]
    (+ `ref_token_logp` [B, L] when kl_coef > 0, + `sampler_token_logp` [B, L] when tis_cap > 0: each
    token's policy term weighted by min(exp(old_token_logp - sampler_token_logp), tis_cap)). Log-probs
    are of logits / `temperature` (the sampling temperature)."""

    def loss_fn(params, mb):
        logp = _token_logp(nnx.merge(graphdef, params, rest), mb, temperature)
        is_weight, tis_aux = None, {}
        if cfg.tis_cap > 0:
            log_is = mb["old_token_logp"] - mb["sampler_token_logp"]
            is_weight, tis_aux = losses.truncated_is_weight(log_is, cfg.tis_cap, mb["resp_mask"])
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
            is_weight=is_weight,
        )
        gap = jnp.abs((logp - mb["old_token_logp"]) * mb["resp_mask"]).max()
        return loss, {"loss": loss, **aux, **tis_aux, "logprob_gap_max": gap}

    return learner_lib.make_update(loss_fn, tx, cfg, lr_fn=lr_fn, name="grpo")


# ----------------------------------------------------------------------------------------------
# The learner


class GRPOLearner(learner_lib.Learner):
    """GRPO over whole episodes: every update plays `grpo.group_size` episodes of each of
    `train.prompts_per_update` prompts (a group shares its env's reset: the same hand / route,
    `envs.rl_hooks(task).group_reset`) and trains on all their turns with group-normalised
    advantages. No value head; nothing survives an update (no checkpointed learner state)."""

    name = "grpo"
    nograd_name = "old_logp_pass"

    make_update_step = staticmethod(make_update_step)
    make_nograd_fn = staticmethod(make_logp_fn)

    @classmethod
    def update_arrays(cls, cfg: GRPOConfig, rows: int) -> dict:
        return {"advantages": ((rows,), np.float32)}

    @classmethod
    def rollout_rows(cls, rl_cfg) -> int:
        return rl_cfg.env.num_envs * rl_cfg.grpo.group_size

    def no_grad_logp(self, params, batch):
        return (self.nograd_fn(params, batch),)

    def update(self) -> dict[str, float]:
        gcfg = self.cfg
        G, P = gcfg.group_size, self.rl_cfg.train.prompts_per_update
        group_seeds = [self.episode_seed(p) for p in range(P)]
        reset = self.hooks.group_reset
        runner = episodes.EpisodeRunner(
            self.envs,
            self.run.tokenizer,
            self.policy(),
            reset_fn=lambda i, ep: reset(self.envs[0], group_seeds[ep // G]),
            scorer=self.reward_scorer,
        )
        t0 = time.perf_counter()
        turns = episodes.run_episodes(runner, P * G)
        t_roll = time.perf_counter() - t0
        self.count_generation(turns)
        table = episodes.episode_table(turns)
        eps = [table[e] for e in sorted(table)]
        adv = episode_advantages(eps, [e // G for e in sorted(table)], gcfg)
        samples = [(t, a) for ep, a in zip(eps, adv) for t in ep]
        # The training forward's token log-probs of every turn under the rollout's parameters, in the
        # first step's layout: the trainer-sampler agreement, and with grpo.old_logp "trainer" the
        # ratio's old log-probs.
        S = gcfg.samples_per_step
        rng = np.random.default_rng([self.rl_cfg.train.seed, self.update_idx])
        epoch_steps = [batching.epoch_steps(rng.permutation(len(samples)), S) for _ in range(gcfg.epochs)]
        first_steps = epoch_steps[0]
        sample_turns = [t for t, _ in samples]
        trainer_logp = self.token_logps_of(sample_turns, steps=first_steps)
        old_of, ref_of, agreement = self.old_and_ref(sample_turns, trainer_logp, first_steps)

        def steps():
            for epoch, idxs in enumerate(epoch_steps):
                for idx in idxs:
                    chosen = [samples[i] for i in idx]
                    real = len(set(idx))  # fewer turns than one step: the step repeats them, with zero advantage
                    adv_step = [a if k < real else 0.0 for k, (_, a) in enumerate(chosen)]
                    yield epoch, [t for t, _ in chosen], {"advantages": np.array(adv_step, np.float32)}

        metrics, out, t_train = self.steps_and_metrics(steps(), old_of, ref_of, agreement)
        out["log_ratio_dev_first_step"] = metrics[0]["logprob_gap_max"]  # vs the old log-probs, token level
        out.update(self.rollout_stats(turns, t_roll, t_train))
        return out

"""PPO with a value head on the shared backbone, turn-level actions (RL4VLM / the paper, SPEC.md §3.3).

One action is one whole response. Its log-prob is the sum of the response's token log-probs under
logits / temperature, with the tokens before the action key (`"formula"` in GP, `"action"` in V-IRL)
weighted by `thought_coef` (0.5). The critic reads the final hidden state at the last prompt token.
Returns come from GAE over the turn buffer (gamma 0.9, lambda 0.95; truncation is terminal);
advantages are normalised over the buffer. Loss = clipped policy loss + `value_coef` x clipped value
loss. Differences from the reference: the first generated token is not dropped from the action
log-prob (a side effect of the reference's slicing), and the action key is found in the decoded
text, not by fixed token ids (which the reference hard-codes and so never finds `"action"`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sftrl_jax import episodes
from sftrl_jax.config import ConfigError, check_ranges
from sftrl_jax.models import logprobs
from sftrl_jax.rl import batching, losses
from sftrl_jax.rl import learner as learner_lib
from sftrl_jax.rl.value_head import PolicyWithValue, ValueHead


@dataclasses.dataclass(frozen=True)
class PPOConfig(learner_lib.AlgoConfig):
    """PPO hyper-parameters; defaults are the paper's (SPEC.md §3.3). `old_logp`: "trainer" (the
    default) is the values pass's own forward (it costs nothing), as the reference does (RL4VLM's
    llava_evaluate after llava_generate); the same pass measures the sampler's agreement every update
    (`sampler_mismatch_frac`, `sampler_abs_log_ratio`). `tis_cap` C > 0: each turn's policy term is
    weighted by min(pi_old(turn) / pi_sampler(turn), C), turn log-probs as `turn_logp` (the action is
    the turn). `kl_coef` is off in the paper (the k3 estimator per response token, mean over the
    step's tokens); `entropy_coef`: - coef x the mean entropy over response tokens."""

    NAME: ClassVar[str] = "ppo"
    epochs: int = 4  # passes over the buffer per update
    samples_per_step: int = 128  # turns per optimiser step (reference: mini-batch 1 x accumulation 128)
    old_logp: str = "trainer"
    gamma: float = 0.9  # discount over turns
    lam: float = 0.95  # GAE lambda
    clip: float = 0.1  # epsilon of the ratio clip
    value_clip: float | None = 0.1  # epsilon of the value clip (None = unclipped)
    value_coef: float = 0.5
    max_ratio: float | None = 10.0  # above it, the clipped surrogate alone is used
    thought_coef: float = 0.5  # weight of the tokens before the action key
    action_keys: tuple[str, ...] = ('"formula"', '"action"')
    normalize_advantages: bool = True
    entropy_coef: float = 0.0
    # The per-turn reward GAE sees: "env" = the environment's (the paper's table, SPEC.md 1.6);
    # "success" = 1 on the turn that solves the task, 0 on every other turn (GRPO's
    # return_mode="success" for PPO). With the paper's table a policy can raise its return without
    # solving more: a legal wrong answer (-1) repeated on every revision turn is safer than a new try
    # that may be illegal (-3); measured on the tiny GP-L model, docs/RESULTS.md.
    reward_mode: str = "env"

    def __post_init__(self):
        self.choice("reward_mode", ("env", "success"))
        super().__post_init__()
        check_ranges(
            self,
            gamma="(0, 1]",
            lam="[0, 1]",
            clip="(0, inf)",
            value_clip="(0, inf)",
            value_coef="[0, inf)",
            max_ratio="(1, inf)",  # a ratio threshold: every ratio starts at 1
            thought_coef="[0, inf)",
            entropy_coef="[0, inf)",
        )

    def check_run(self, run_cfg) -> None:
        """The run's other sections against this one (`rl.config.RLConfig`)."""
        env, t = run_cfg.env, run_cfg.train
        if (env.num_envs * t.steps_per_update) % self.samples_per_step:
            raise ConfigError(
                f"env.num_envs x train.steps_per_update ({env.num_envs} x {t.steps_per_update}) "
                f"must be a multiple of ppo.samples_per_step ({self.samples_per_step})"
            )

    def steps_per_update(self, run_cfg) -> int:
        """Optimiser steps per update."""
        return self.epochs * run_cfg.env.num_envs * run_cfg.train.steps_per_update // self.samples_per_step


# ----------------------------------------------------------------------------------------------
# Device side


def forward(policy, batch: dict[str, jax.Array], temperature: float, *, entropy: bool = False):
    """Token log-probs [B, L] (logits / temperature, fp32) and values [B]; with `entropy`, also the
    token entropies [B, L] of the tempered distribution."""
    head = logprobs.forward(policy.model, batch, temperature=temperature, entropy=entropy, hidden=True)
    h = jnp.take_along_axis(head["hidden"], batch["value_index"][:, None, None], axis=1)[:, 0]  # [B, D]
    if entropy:
        return head["logp"], policy.value_head(h), head["entropy"]
    return head["logp"], policy.value_head(h)


def turn_logp(token_logp: jax.Array, batch) -> jax.Array:
    return (token_logp * batch["weights"] * batch["resp_mask"]).sum(-1)


def make_value_fn(graphdef, rest, temperature: float):
    """(params, batch) -> (values [B], turn log-probs [B], token log-probs [B, L]) without gradients."""

    def value_fn(params, batch):
        policy = nnx.merge(graphdef, params, rest)
        logp, values = forward(policy, batch, temperature)
        return values, turn_logp(logp, batch), logp

    return value_fn


def make_update_step(graphdef, rest, tx: optax.GradientTransformation, cfg: PPOConfig, *, lr_fn, temperature: float):
    """Pure PPO optimiser step over `samples_per_step` turns, scanned in `micro_batch` chunks.

    batch (leading dim = samples_per_step): the arrays of `batching.build_batch`, with `old_token_logp` [B, L]
    the token log-probs the ratio is taken against (`PPOConfig.old_logp`: the sampler's, as built,
    or the trainer's), plus `old_values` [B], `advantages` [B], `returns` [B]; and, when
    `cfg.kl_coef` > 0, `ref_token_logp` [B, L] (the reference policy's token log-probs). The turn
    ratio is exp(sum_t w_t (log pi(a_t) - old_token_logp_t)) over the response tokens, w_t the
    `thought_coef` weights: the ratio of the turn-level action probabilities of `turn_logp`.
    Log-probs are of logits / `temperature` (the sampling temperature). With `cfg.tis_cap` > 0 the
    batch also holds `sampler_token_logp` [B, L] (the sampler's token log-probs): each turn's policy
    term is weighted by min(exp(turn_logp(old_token_logp - sampler_token_logp)), tis_cap).
    """
    use_entropy = cfg.entropy_coef > 0

    def loss_fn(params, mb):
        policy = nnx.merge(graphdef, params, rest)
        logp_tok, values, *ent = forward(policy, mb, temperature, entropy=use_entropy)
        # The turn's log ratio as the weighted sum of its token log ratios, not as the difference of
        # two turn log-probs: those sums reach hundreds at low temperature, where one fp32 ulp is
        # ~3e-5, so equal token log-probs could give a ratio off by that much.
        log_ratio = turn_logp(logp_tok - mb["old_token_logp"], mb)
        extra, is_weight = {}, None
        if cfg.tis_cap > 0:
            log_is = turn_logp(mb["old_token_logp"] - mb["sampler_token_logp"], mb)
            is_weight, tis_aux = losses.truncated_is_weight(log_is, cfg.tis_cap)
            extra.update(tis_aux)
        pg, pg_aux = losses.ppo_policy_loss(
            log_ratio,
            jnp.zeros_like(log_ratio),
            mb["advantages"],
            clip=cfg.clip,
            max_ratio=cfg.max_ratio,
            is_weight=is_weight,
        )
        vl, v_aux = losses.value_loss(values, mb["old_values"], mb["returns"], clip=cfg.value_clip)
        loss = pg + cfg.value_coef * vl
        if cfg.kl_coef > 0:
            extra["ref_kl"] = losses.masked_mean(
                losses.kl_k3(logp_tok, mb["ref_token_logp"], mb["resp_mask"]), mb["resp_mask"]
            )
            loss = loss + cfg.kl_coef * extra["ref_kl"]
        if use_entropy:
            extra["entropy"] = losses.masked_mean(ent[0], mb["resp_mask"])
            loss = loss - cfg.entropy_coef * extra["entropy"]
        gap = jnp.abs((logp_tok - mb["old_token_logp"]) * mb["resp_mask"]).max()
        ratio_dev = jnp.abs(jnp.exp(log_ratio) - 1.0).max()
        aux = {"loss": loss, "policy_loss": pg, "value_loss": vl, **pg_aux, **v_aux, **extra}
        return loss, {**aux, "logprob_gap_max": gap, "ratio_dev_max": ratio_dev}

    return learner_lib.make_update(loss_fn, tx, cfg, lr_fn=lr_fn, name="ppo")


def advantages_for(
    rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, last_values: np.ndarray, cfg: PPOConfig
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over the [T, E] buffer, then (optionally) normalised advantages; returns (adv, returns)."""
    from sftrl_jax.rl import advantages as adv_lib

    adv, ret = adv_lib.gae(rewards, values, dones, last_values, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.normalize_advantages:
        adv = adv_lib.normalize(adv)
    return np.asarray(adv), np.asarray(ret)


def explained_variance(values, returns) -> float:
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant."""
    var = np.var(returns)
    return float(1 - np.var(returns - values) / var) if var > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# The learner


class PPOLearner(learner_lib.Learner):
    """PPO over lock-step rollouts: every update collects `train.steps_per_update` turns from each
    env (episodes continue across updates, so the runner's state is checkpointed), computes values
    and GAE, and runs `ppo.epochs` shuffled passes of clipped steps."""

    name = "ppo"
    nograd_name = "values_pass"

    def __init__(self, run, rl_cfg, compute):
        super().__init__(run, rl_cfg, compute)
        self.value_fn = self.nograd_fn
        self.runner: episodes.EpisodeRunner | None = None
        self._rollout_state: dict[str, Any] | None = None  # restored runner state, applied lazily

    make_update_step = staticmethod(make_update_step)
    make_nograd_fn = staticmethod(make_value_fn)

    @classmethod
    def update_arrays(cls, cfg: PPOConfig, rows: int) -> dict:
        return {k: ((rows,), np.float32) for k in ("old_values", "advantages", "returns")}

    @staticmethod
    def policy_module(model, *, seed: int):
        return PolicyWithValue(model, ValueHead(model.config.text.hidden_size, rngs=nnx.Rngs(seed + 1)))

    @staticmethod
    def language_model(module):
        return module.model

    def state(self) -> dict[str, Any] | None:
        if self.runner is not None:
            return self.runner.state()
        return self._rollout_state  # resumed but not stepped yet: keep what was restored

    def load_state(self, state: dict[str, Any] | None) -> None:
        self._rollout_state = state

    def no_grad_logp(self, params, batch):
        return self.value_fn(params, batch)[2:]

    def collect(self) -> tuple[list[list[episodes.Turn]], list[episodes.Turn]]:
        """The update's [T][E] turn buffer and its turns flattened (time-major)."""
        if self.runner is None:
            self.runner = episodes.EpisodeRunner(
                self.envs,
                self.run.tokenizer,
                None,
                reset_fn=lambda i, ep: (self.episode_seed(ep), None),
                scorer=self.reward_scorer,
            )
            if self._rollout_state is not None:
                self.runner.load_state(self._rollout_state)
                self._rollout_state = None
        self.runner.policy = self.policy()
        buffer = episodes.collect(self.runner, self.rl_cfg.train.steps_per_update)
        flat = [t for row in buffer for t in row]
        self.count_generation(flat)
        return buffer, flat

    def values_of(self, turns, steps=None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(values, trainer turn log-probs, trainer token log-probs of each response) of turns, in
        micro-batches laid out as `steps` (`batching.Batcher.rows_of`)."""
        params = self.run.state.params
        rows = self.batcher.rows_of(turns, self.cfg.micro_batch, lambda b: self.value_fn(params, b), steps)
        tokens = [batching.response_row(t, r[2]) for t, r in zip(turns, rows)]
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), tokens

    def next_values(self) -> np.ndarray:
        """V of each env's next context (bootstrap for GAE); 0 where no episode is in progress."""
        out = np.zeros(len(self.runner.envs), np.float32)
        ctx = self.runner.contexts()
        if not ctx:
            return out
        fake = [
            episodes.Turn(i, -1, 0, c, [], [], "", 0.0, False, False, list(self.runner.images[i]), {}) for i, c in ctx
        ]
        values, _, _ = self.values_of(fake)
        for (i, _), v in zip(ctx, values):
            out[i] = v
        return out

    def sampler_turn_logp(self, t: episodes.Turn) -> float:
        """The sampler's turn log-prob (`turn_logp` of its token log-probs)."""
        start = batching.action_start(self.run.tokenizer, t.response_ids, self.cfg.action_keys)
        lp = np.asarray(t.logprobs, np.float64)
        w = np.where(np.arange(len(lp)) < start, self.cfg.thought_coef, 1.0)
        return float((lp * w).sum())

    def update(self) -> dict[str, float]:
        pcfg = self.cfg
        t0 = time.perf_counter()
        buffer, flat = self.collect()
        t_roll = time.perf_counter() - t0
        T, E = len(buffer), len(buffer[0])
        rewards, dones = episodes.rewards_array(buffer, pcfg.reward_mode)
        rng = np.random.default_rng([self.rl_cfg.train.seed, self.update_idx])
        orders = [rng.permutation(len(flat)) for _ in range(pcfg.epochs)]
        S = pcfg.samples_per_step
        first_steps = [orders[0][s : s + S] for s in range(0, len(flat), S)]
        values, trainer_logp, trainer_tokens = self.values_of(flat, first_steps)
        last = self.next_values()
        adv, ret = advantages_for(rewards, values.reshape(T, E), dones, last, pcfg)
        adv, ret = adv.reshape(-1), ret.reshape(-1)
        sampler_logp = np.array([self.sampler_turn_logp(t) for t in flat], np.float32)
        # ppo.old_logp "trainer": the ratio's old token log-probs are the values pass's (else the
        # sampler's, which `build_batch` puts in old_token_logp)
        old_of, ref_of, agreement = self.old_and_ref(flat, trainer_tokens, first_steps)

        def steps():
            for epoch, order in enumerate(orders):
                for s in range(0, len(order), S):
                    idx = order[s : s + S]
                    extra = {
                        "old_values": values[idx].astype(np.float32),
                        "advantages": adv[idx].astype(np.float32),
                        "returns": ret[idx].astype(np.float32),
                    }
                    yield epoch, [flat[i] for i in idx], extra

        metrics, out, t_train = self.steps_and_metrics(steps(), old_of, ref_of, agreement)
        out["ratio_dev_first_step"] = metrics[0]["ratio_dev_max"]  # turn level, against `ppo.old_logp`
        out["value_explained_variance"] = float(explained_variance(values, ret))
        out["trainer_sampler_turn_logp_gap"] = float(np.max(np.abs(trainer_logp - sampler_logp)))
        out.update(self.rollout_stats(flat, t_roll, t_train))
        return out

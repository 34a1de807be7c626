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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sftrl_jax.config import ConfigError
from sftrl_jax.rl import losses
from sftrl_jax.rl.rollout import Turn
from sftrl_jax.sft.losses import token_logprobs

IMAGE_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters; defaults are the paper's (SPEC.md §3.3)."""

    gamma: float = 0.9  # discount over turns
    lam: float = 0.95  # GAE lambda
    clip: float = 0.1  # epsilon of the ratio clip
    value_clip: float | None = 0.1  # epsilon of the value clip (None = unclipped)
    value_coef: float = 0.5
    max_ratio: float | None = 10.0  # above it, the clipped surrogate alone is used
    epochs: int = 4  # passes over the buffer per update
    samples_per_step: int = 128  # turns per optimiser step (reference: mini-batch 1 x accumulation 128)
    micro_batch: int = 8  # turns per forward/backward inside a step
    thought_coef: float = 0.5  # weight of the tokens before the action key
    action_keys: tuple[str, ...] = ('"formula"', '"action"')
    normalize_advantages: bool = True
    temperature: float = 0.2  # the sampling temperature: log-probs use logits / temperature
    # Where the ratio's old turn log-probs come from: "trainer" = the training forward over the
    # rollout's turns (the pass that computes the values, so it costs nothing), as the reference
    # does (RL4VLM's llava_evaluate after llava_generate); "sampler" = the sampler's log-probs.
    # "trainer" runs each turn in the first optimiser step's batch layout: the first step's ratio is
    # exactly 1 in the tests' settings, while on trained tiny models the update's own forward still
    # differs from it by up to ~4e-5 (XLA compiles the two programs differently), about as much as
    # the sampler's log-probs do (docs/RESULTS.md).
    old_logp: str = "trainer"
    # Off in the paper. kl_coef beta: + beta * KL(pi || pi_ref), the k3 estimator per response token
    # (mean over the step's tokens), pi_ref = the policy the run started from (model.init, frozen).
    # entropy_coef: - coef * the mean entropy of the next-token distribution over response tokens.
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    # The per-turn reward GAE sees: "env" = the environment's (the paper's table, SPEC.md 1.6);
    # "success" = 1 on the turn that solves the task, 0 on every other turn (GRPO's
    # return_mode="success" for PPO). With the paper's table a policy can raise its return without
    # solving more: a legal wrong answer (-1) repeated on every revision turn is safer than a new try
    # that may be illegal (-3); measured on the tiny GP-L model, docs/RESULTS.md.
    reward_mode: str = "env"

    def __post_init__(self):
        if self.reward_mode not in ("env", "success"):
            raise ConfigError(f"ppo.reward_mode must be 'env' or 'success', got {self.reward_mode!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ConfigError(
                f"ppo.kl_coef and ppo.entropy_coef must be >= 0, got {self.kl_coef} and {self.entropy_coef}"
            )
        if self.samples_per_step % self.micro_batch:
            raise ConfigError(
                f"ppo.samples_per_step ({self.samples_per_step}) must be a multiple of ppo.micro_batch ({self.micro_batch})"
            )
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"ppo.gamma must be in (0, 1] and ppo.lam in [0, 1], got {self.gamma}, {self.lam}")
        if self.temperature <= 0:
            raise ConfigError(f"ppo.temperature must be positive, got {self.temperature}")
        if self.old_logp not in ("trainer", "sampler"):
            raise ConfigError(f"ppo.old_logp must be 'trainer' or 'sampler', got {self.old_logp!r}")


# ----------------------------------------------------------------------------------------------
# Host side: turns -> padded arrays


def action_start(tokenizer, response_ids: Sequence[int], keys: Sequence[str]) -> int:
    """Index of the first response token of the action part; tokens before it are "thought".

    The first occurrence of any key in the decoded text; without one, the last 4 tokens are the
    action (the reference's fallback).
    """
    ids = list(response_ids)
    text = tokenizer.decode(ids)
    found = [text.find(k) for k in keys if text.find(k) >= 0]
    if not found:
        return max(len(ids) - 4, 0)
    char = min(found)
    for i in range(len(ids) + 1):  # smallest prefix whose text reaches past the key's first char
        if len(tokenizer.decode(ids[:i])) > char:
            return max(i - 1, 0)
    return len(ids)


def pad_length(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ConfigError(f"a PPO sample of {n} tokens exceeds the largest length bucket {buckets[-1]}")


def build_batch(
    turns: Sequence[Turn],
    tokenizer,
    cfg: PPOConfig,
    *,
    buckets: Sequence[int],
    image_processor=None,
    max_images: int = 1,
) -> dict[str, np.ndarray]:
    """Right-padded [B, L] arrays for the PPO forward: `input_ids`, `attention_mask`, `targets` (the
    next token at response positions, 0 elsewhere), `resp_mask` (1 where the target is a response token), `weights` (thought_coef or 1 on those),
    `value_index` [B] (last prompt token), `old_token_logp` [B, L] (sampler log-probs, aligned with
    targets); plus Mllama image arrays when `image_processor` is given."""
    lengths = [len(t.context_ids) + len(t.response_ids) for t in turns]
    L = pad_length(max(lengths), buckets)
    B = len(turns)
    input_ids = np.full((B, L), tokenizer.pad_id, np.int32)
    attention = np.zeros((B, L), np.int32)
    targets = np.zeros((B, L), np.int32)
    resp_mask = np.zeros((B, L), np.float32)
    weights = np.zeros((B, L), np.float32)
    old = np.zeros((B, L), np.float32)
    value_index = np.zeros((B,), np.int32)
    for b, t in enumerate(turns):
        c, r = len(t.context_ids), len(t.response_ids)
        seq = list(t.context_ids) + list(t.response_ids)
        input_ids[b, : c + r] = seq
        attention[b, : c + r] = 1
        # Targets only where a response token is predicted: prompt positions are never scored, and
        # one of them predicts <|image|>, which is outside the output vocabulary of Mllama (an extra
        # embedding row), so its log-prob would be a NaN gather that poisons masked sums and grads.
        targets[b, c - 1 : c + r - 1] = t.response_ids
        resp_mask[b, c - 1 : c + r - 1] = 1.0
        s = action_start(tokenizer, t.response_ids, cfg.action_keys)
        w = np.where(np.arange(r) < s, cfg.thought_coef, 1.0)
        weights[b, c - 1 : c + r - 1] = w
        old[b, c - 1 : c - 1 + len(t.logprobs)] = t.logprobs[:r]
        value_index[b] = c - 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "targets": targets,
        "resp_mask": resp_mask,
        "weights": weights,
        "old_token_logp": old,
        "value_index": value_index,
    }
    if image_processor is not None:
        from sftrl_jax.data.processor import cross_attention_mask

        arrays = image_processor([t.images for t in turns], max_images=max_images)
        batch.update({k: v for k, v in arrays.items() if k != "num_tiles"})
        batch["cross_attention_mask"] = np.stack(
            [
                cross_attention_mask(
                    list(input_ids[b, : lengths[b]]),
                    tokenizer.image_token_id,
                    num_tiles=list(arrays["num_tiles"][b][: len(t.images)]),
                    max_tiles=image_processor.max_tiles,
                    length=L,
                    max_images=max_images,
                )
                for b, t in enumerate(turns)
            ]
        )
    return batch


# ----------------------------------------------------------------------------------------------
# Device side


def forward(policy, batch: dict[str, jax.Array], temperature: float, *, entropy: bool = False):
    """Token log-probs [B, L] (logits / temperature, fp32) and values [B]; with `entropy`, also the
    token entropies [B, L] of the tempered distribution."""
    model_inputs = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    out = policy.model(batch["input_ids"], attention_mask=batch["attention_mask"], **model_inputs)
    z = out.logits.astype(jnp.float32) / temperature
    logp = token_logprobs(z, batch["targets"])
    h = jnp.take_along_axis(out.hidden_states, batch["value_index"][:, None, None], axis=1)[:, 0]
    if entropy:
        return logp, policy.value_head(h), losses.token_entropy(z)
    return logp, policy.value_head(h)


def turn_logp(token_logp: jax.Array, batch) -> jax.Array:
    return (token_logp * batch["weights"] * batch["resp_mask"]).sum(-1)


def make_value_fn(graphdef, rest, temperature: float):
    """(params, batch) -> (values [B], turn log-probs [B], token log-probs [B, L]) without gradients."""

    def value_fn(params, batch):
        policy = nnx.merge(graphdef, params, rest)
        logp, values = forward(policy, batch, temperature)
        return values, turn_logp(logp, batch), logp

    return value_fn


def make_update_step(graphdef, rest, tx: optax.GradientTransformation, cfg: PPOConfig, *, lr_fn):
    """Pure PPO optimiser step over `samples_per_step` turns, scanned in `micro_batch` chunks.

    batch (leading dim = samples_per_step): the arrays of `build_batch`, with `old_token_logp` [B, L]
    the token log-probs the ratio is taken against (`PPOConfig.old_logp`: the sampler's, as built,
    or the trainer's), plus `old_values` [B], `advantages` [B], `returns` [B]; and, when
    `cfg.kl_coef` > 0, `ref_token_logp` [B, L] (the reference policy's token log-probs). The turn
    ratio is exp(sum_t w_t (log pi(a_t) - old_token_logp_t)) over the response tokens, w_t the
    `thought_coef` weights: the ratio of the turn-level action probabilities of `turn_logp`.
    """
    n_micro = cfg.samples_per_step // cfg.micro_batch
    use_entropy = cfg.entropy_coef > 0

    def loss_fn(params, mb):
        policy = nnx.merge(graphdef, params, rest)
        logp_tok, values, *ent = forward(policy, mb, cfg.temperature, entropy=use_entropy)
        # The turn's log ratio as the weighted sum of its token log ratios, not as the difference of
        # two turn log-probs: those sums reach hundreds at low temperature, where one fp32 ulp is
        # ~3e-5, so equal token log-probs could give a ratio off by that much.
        log_ratio = turn_logp(logp_tok - mb["old_token_logp"], mb)
        pg, pg_aux = losses.ppo_policy_loss(
            log_ratio, jnp.zeros_like(log_ratio), mb["advantages"], clip=cfg.clip, max_ratio=cfg.max_ratio
        )
        vl, v_aux = losses.value_loss(values, mb["old_values"], mb["returns"], clip=cfg.value_clip)
        loss = pg + cfg.value_coef * vl
        extra = {}
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

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state, batch):
        if cfg.kl_coef > 0 and "ref_token_logp" not in batch:
            raise ValueError(
                f"ppo.kl_coef = {cfg.kl_coef} needs the reference's token log-probs in the batch (ref_token_logp)"
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


def advantages_for(
    rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, last_values: np.ndarray, cfg: PPOConfig
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over the [T, E] buffer, then (optionally) normalised advantages; returns (adv, returns)."""
    from sftrl_jax.rl import advantages as adv_lib

    adv, ret = adv_lib.gae(rewards, values, dones, last_values, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.normalize_advantages:
        adv = adv_lib.normalize(adv)
    return np.asarray(adv), np.asarray(ret)


def stack(batches: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

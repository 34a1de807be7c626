"""Choosing the next token from one step's logits, and the three log-probs the sampler reports.

`logits` are [B, V] fp32 (the model's LM head output). With temperature T, top-k k and top-p p:

- `raw`:         log_softmax(logits)[token]
- `temperature`: log_softmax(logits / T)[token] over the FULL vocabulary: the PPO trainer's
                 definition (`sftrl_jax.rl.ppo.forward`); for greedy decoding (T == 0) it is `raw`.
- `processed`:   the log-prob under the distribution actually sampled from: logits / T, then the top-k
                 filter, then the top-p filter, renormalised over the kept set; 0 for greedy (a point
                 mass on the argmax).

Filters follow transformers' logits warpers (temperature, then top-k, then top-p on the top-k
renormalised distribution): top-k keeps every token whose scaled logit is >= the k-th largest (ties
kept), top-p keeps the highest tokens while the mass ranked above them is < p (at least one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Method:
    """How tokens are chosen (static: part of the compiled sampler)."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Choice:
    token: jax.Array  # [B] int32
    processed: jax.Array  # [B] fp32
    raw: jax.Array  # [B] fp32
    temperature: jax.Array  # [B] fp32


def kept(scaled: jax.Array, *, top_k: int, top_p: float) -> jax.Array | None:
    """[B, V] bool: the tokens top-k then top-p keep (None when neither filter is on)."""
    vocab = scaled.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p >= 1.0:
        return None
    # Descending candidates: the top-k ones, or the whole sorted vocabulary for top-p alone.
    values = jax.lax.top_k(scaled, top_k if use_k else vocab)[0]  # [B, k]
    threshold = values[:, -1:]
    if top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(mass_above < top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(values, n_keep - 1, axis=-1)
    return scaled >= threshold


def _pick(logp: jax.Array, token: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def choose(logits: jax.Array, keys: jax.Array | None, method: Method) -> Choice:
    """Next token and its log-probs. `keys` [B] holds one PRNG key per row (unused when greedy), so a
    row's draw depends only on its own key, not on the batch it was run in."""
    logits = logits.astype(jnp.float32)
    raw = jax.nn.log_softmax(logits, axis=-1)
    if method.greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        lp = _pick(raw, token)
        return Choice(token=token, processed=jnp.zeros_like(lp), raw=lp, temperature=lp)
    scaled = logits / method.temperature
    full = jax.nn.log_softmax(scaled, axis=-1)
    mask = kept(scaled, top_k=method.top_k, top_p=method.top_p)
    filtered = scaled if mask is None else jnp.where(mask, scaled, NEG_INF)
    token = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    processed = full if mask is None else jax.nn.log_softmax(filtered, axis=-1)
    return Choice(token=token, processed=_pick(processed, token), raw=_pick(raw, token), temperature=_pick(full, token))


def row_keys(key: jax.Array, step: jax.Array, rows: jax.Array) -> jax.Array:
    """One key per row for decode step `step`: fold_in(fold_in(key, row), step)."""
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows)

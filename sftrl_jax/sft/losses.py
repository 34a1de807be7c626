"""SFT loss: next-token cross-entropy on assistant tokens only, in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sftrl_jax.models import logprobs


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean negative log-likelihood over tokens where `loss_mask` is 1.

    Returns (loss, aux) with aux = {"nll_sum", "tokens", "correct"} so that gradient accumulation can
    re-weight micro-batches by their token counts.
    """
    logp = logprobs.token_logprobs(logits, targets)
    return sft_loss_from_logp(logp, jnp.argmax(logits, axis=-1), targets, loss_mask)


def sft_loss_from_hidden(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, loss_mask: jax.Array, *, chunk_tokens: int | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sft_loss` of logits = hidden [B, T, D] @ head [D, V] without the whole logits tensor: the head
    is applied chunk by chunk over the sequence (`models.logprobs.head_logprobs`)."""
    out = logprobs.head_logprobs(hidden, head, targets, argmax=True, chunk_tokens=chunk_tokens)
    return sft_loss_from_logp(out["logp"], out["argmax"], targets, loss_mask)


def sft_loss_from_logp(logp, predicted, targets, loss_mask) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sft_loss` from the targets' log-probs [B, T] and the predicted (argmax) tokens [B, T], as
    `models.logprobs.forward(model, batch, argmax=True)` gives them."""
    mask = loss_mask.astype(jnp.float32)
    tokens = mask.sum()
    nll_sum = -(logp * mask).sum()
    correct = ((predicted == targets) * mask).sum()
    return nll_sum / jnp.maximum(tokens, 1.0), {"nll_sum": nll_sum, "tokens": tokens, "correct": correct}

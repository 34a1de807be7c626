"""SFT loss: next-token cross-entropy on assistant tokens only, in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sftrl_jax.sampling import logprobs


def sft_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean negative log-likelihood over tokens where `loss_mask` is 1.

    Returns (loss, aux) with aux = {"nll_sum", "tokens", "correct"} so that gradient accumulation can
    re-weight micro-batches by their token counts.
    """
    mask = loss_mask.astype(jnp.float32)
    logp = logprobs.token_logprobs(logits, targets)
    tokens = mask.sum()
    nll_sum = -(logp * mask).sum()
    correct = ((jnp.argmax(logits, axis=-1) == targets) * mask).sum()
    return nll_sum / jnp.maximum(tokens, 1.0), {"nll_sum": nll_sum, "tokens": tokens, "correct": correct}

"""SFT loss: next-token cross-entropy on assistant tokens only, in fp32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sft_loss_from_logp(logp, predicted, targets, loss_mask) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean negative log-likelihood over tokens where `loss_mask` is 1, from the targets' log-probs
    [B, T] and the predicted (argmax) tokens [B, T], as `models.logprobs.forward(model, batch,
    argmax=True)` gives them. Returns (loss, aux) with aux = {"nll_sum", "tokens", "correct"} so that
    gradient accumulation can re-weight micro-batches by their token counts."""
    mask = loss_mask.astype(jnp.float32)
    tokens = mask.sum()
    nll_sum = -(logp * mask).sum()
    correct = ((predicted == targets) * mask).sum()
    return nll_sum / jnp.maximum(tokens, 1.0), {"nll_sum": nll_sum, "tokens": tokens, "correct": correct}

"""How far a policy has moved from a reference (the study's Init): per-token KL on fixed prompts.

    r = policy_kl(model, init_model, tokenizer, prompts, max_new_tokens=64)
    r["kl"], r["kl_reverse"], r["tokens"]

For each prompt the policy answers greedily (its own behaviour, as evaluated); along that answer
both models are run teacher-forced, and at every answer position the full next-token distributions
give KL(policy || reference) and KL(reference || policy). Reported: the mean over all answer tokens
of all prompts (nats per token). The greedy answer makes the number deterministic for a checkpoint;
it is an estimate of the sequence KL per token on the policy's own outputs (the quantity "RL's Razor",
Shenfeld et al. 2025, relates to forgetting), not an exact expectation over sampled answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax import sampling
from sftrl_jax.models import logprobs


@nnx.jit
def _logprobs(model, ids, mask):
    return logprobs.full_logprobs(model, {"input_ids": ids, "attention_mask": mask})


def _pad(rows: Sequence[Sequence[int]], pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def policy_kl(
    model,
    reference,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    bucket: int = 64,
) -> dict[str, Any]:
    """Mean per-token KL(model || reference) and KL(reference || model) along `model`'s greedy
    answers to `prompts` (token-id lists, each ending in the assistant header)."""
    kl_sum, rev_sum, n_tokens = 0.0, 0.0, 0
    for lo in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[lo : lo + batch_size]]
        res = sampling.generate(
            model,
            chunk,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop_tokens=tokenizer.stop_ids,
            pad_id=tokenizer.pad_id,
        )
        tokens, lengths = np.asarray(res.tokens), np.asarray(res.lengths)
        answers = [list(tokens[i, : int(lengths[i])]) for i in range(len(chunk))]
        rows = [p + a for p, a in zip(chunk, answers, strict=True)]
        length = -(-max(len(r) for r in rows) // bucket) * bucket  # few distinct shapes: few compiles
        ids, mask = _pad(rows, tokenizer.pad_id, length)
        lp = np.asarray(_logprobs(model, jnp.asarray(ids), jnp.asarray(mask)))
        lq = np.asarray(_logprobs(reference, jnp.asarray(ids), jnp.asarray(mask)))
        for i, (p, a) in enumerate(zip(chunk, answers, strict=True)):
            if not a:
                continue
            pos = slice(len(p) - 1, len(p) - 1 + len(a))  # the positions that predict the answer tokens
            a_lp, a_lq = lp[i, pos], lq[i, pos]
            kl_sum += float((np.exp(a_lp) * (a_lp - a_lq)).sum())
            rev_sum += float((np.exp(a_lq) * (a_lq - a_lp)).sum())
            n_tokens += len(a)
    n = max(n_tokens, 1)
    return {"kl": kl_sum / n, "kl_reverse": rev_sum / n, "tokens": n_tokens, "prompts": len(prompts)}

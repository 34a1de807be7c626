"""Token log-probs of a forward, and the trainer-sampler gap: sampler log-probs vs the training
forward's, for the same tokens.

`models.logprobs.forward` is the one forward to token log-probs (the SFT loss, PPO, GRPO, old and
reference log-probs, and the teacher-forced check here); `token_logprobs` is re-exported from it.

PPO (`sftrl_jax.rl.ppo.forward`) scores a response teacher-forced on context + response, right
padded, as `log_softmax(logits / T)` over the full vocabulary. `teacher_forced_logprobs` runs exactly
that forward (`models.logprobs.forward`, the same call); `logprob_gap` compares it with a sampler
result's `logprobs_temperature`. A gap above ~1e-5 in fp32 means the two forwards disagree, and PPO
ratios would be biased from the first epoch on; training runs log it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax.data import rows
from sftrl_jax.errors import UserError
from sftrl_jax.models import config as config_lib
from sftrl_jax.models import logprobs as model_logprobs
from sftrl_jax.models.logprobs import token_logprobs as token_logprobs  # re-exported
from sftrl_jax.sampling import inputs
from sftrl_jax.sampling.sampler import GenerateResult


def _forward(params, batch, temperature, *, graphdef):
    return model_logprobs.forward(nnx.merge(graphdef, params), batch, temperature=temperature)["logp"]


_forward_jit = jax.jit(_forward, static_argnames=("graphdef",))


def teacher_forced_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    pixel_values: Any = None,
    aspect_ratio_ids: Any = None,
    aspect_ratio_mask: Any = None,
) -> list[np.ndarray]:
    """log_softmax(logits / T) of each response token given its prompt and the response before it,
    from one full forward over prompt + response (right padded, the trainer's layout). T = 0 means 1.

    Image tokens see their image from their `<|image|>` token on, and the response sees the last
    image group, as in the sampler (and transformers' generate)."""
    if len(prompts) != len(responses):
        raise UserError(f"{len(prompts)} prompts but {len(responses)} responses")
    t = float(temperature) if temperature > 0 else 1.0
    config = model.config
    seqs = [list(map(int, p)) + list(map(int, r)) for p, r in zip(prompts, responses)]
    length = inputs.prompt_bucket(max(len(s) for s in seqs))
    batch = rows.right_padded(seqs, length=length, pad_id=config.text.pad_token_id or 0)
    batch["targets"] = rows.place([s[1:] for s in seqs], [0] * len(seqs), length=length)
    if pixel_values is not None:
        if not isinstance(config, config_lib.MllamaConfig):
            raise UserError(f"image inputs were given but the model ({config.architecture}) has no vision tower")
        ar_mask = np.asarray(aspect_ratio_mask)
        tiles = ar_mask.astype(bool).sum(-1)  # [B, I]
        batch.update(
            pixel_values=np.asarray(pixel_values, np.float32),
            aspect_ratio_ids=np.asarray(aspect_ratio_ids, np.int32),
            aspect_ratio_mask=ar_mask.astype(np.int32),
            cross_attention_mask=rows.cross_attention_mask(
                seqs,
                [tiles[b, : s.count(config.image_token_index)] for b, s in enumerate(seqs)],
                image_token_id=config.image_token_index,
                max_tiles=ar_mask.shape[2],
                images=ar_mask.shape[1],
                length=length,
            ),
        )
    graphdef, params = nnx.split(model)
    logp = np.asarray(_forward_jit(params, batch, jnp.float32(t), graphdef=graphdef))
    return [logp[b, len(p) - 1 : len(s) - 1] for b, (p, s) in enumerate(zip(prompts, seqs))]


def max_gap(sampler_logprobs: Sequence[np.ndarray], trainer_logprobs: Sequence[np.ndarray]) -> float:
    """max |sampler - trainer| over every token of every row (0 for no tokens)."""
    gaps = [
        np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0) for a, b in zip(sampler_logprobs, trainer_logprobs)
    ]
    return float(max(gaps, default=0.0))


def logprob_gap(model, prompts: Sequence[Sequence[int]], result: GenerateResult, **image_inputs) -> float:
    """Max abs difference between `result.logprobs_temperature` and the teacher-forced log-probs of
    the same generated tokens (the metric training runs log as the trainer-sampler gap)."""
    responses = result.responses()
    trainer = teacher_forced_logprobs(model, prompts, responses, temperature=result.temperature, **image_inputs)
    sampler = [row[: len(r)] for row, r in zip(result.logprobs_temperature, responses)]
    return max_gap(sampler, trainer)

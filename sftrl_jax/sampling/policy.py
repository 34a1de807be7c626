"""The sampler as a rollout policy: `policy(contexts, images) -> [(response_ids, logprobs)]`.

Used by `rl.rollout.EpisodeRunner` (training rollouts and evaluation). A response runs up to and
including the first stop token (or `max_new_tokens`). The log-probs are `log_softmax(logits /
temperature)` over the full vocabulary, the quantity PPO's trainer recomputes teacher-forced (raw
log-probs when greedy). Each call draws from a fresh seed (`seed + call index`), so a run with a
fixed seed is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sftrl_jax.sampling.sampler import generate


class Policy:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        image_processor=None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.seed = seed
        self.image_processor = image_processor
        self.calls = 0

    def __call__(
        self, contexts: Sequence[Sequence[int]], images: Sequence[Sequence[Any]]
    ) -> list[tuple[list[int], list[float]]]:
        image_inputs = {}
        if self.image_processor is not None and any(len(i) for i in images):
            arrays = self.image_processor([list(i) for i in images])
            image_inputs = {k: arrays[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        result = generate(
            self.model,
            [list(c) for c in contexts],
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_tokens=self.tokenizer.stop_ids,
            seed=self.seed + self.calls,
            pad_id=self.tokenizer.pad_id,
            **image_inputs,
        )
        self.calls += 1
        logp = result.logprobs_temperature
        return [
            (list(map(int, result.tokens[b, :n])), [float(x) for x in np.asarray(logp[b, :n])])
            for b, n in enumerate(result.lengths)
        ]

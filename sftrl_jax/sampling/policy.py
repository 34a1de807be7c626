"""The sampler as a rollout policy (`sftrl_jax.episodes.Policy`): contexts in, responses out.

    policy = Policy(model, tokenizer, max_new_tokens=512, temperature=0.2, seed=0,
                    image_processor=ImageProcessor(tile_size=560, max_tiles=4))
    [(response_ids, logprobs), ...] = policy(contexts, images)

`response_ids` run up to and including the first stop token (the tokenizer's `stop_ids` by default),
or are `max_new_tokens` long if none came. `logprobs[i]` is log_softmax(logits / T) of
`response_ids[i]` over the full vocabulary (T = the sampling temperature; raw log-probs when T = 0):
exactly the quantity PPO's trainer computes teacher-forced (`sftrl_jax.rl.ppo.forward`), so the
PPO ratio starts at 1. Each call draws with a fresh seed derived from (seed, call number).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sftrl_jax.errors import UserError
from sftrl_jax.models import logprobs as model_logprobs
from sftrl_jax.sampling import sampler


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
        stop_tokens: Sequence[int] | None = None,
        mesh=None,
        layout: str = "auto",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.seed = int(seed)
        self.image_processor = image_processor
        self.stop_tokens = tuple(tokenizer.stop_ids if stop_tokens is None else stop_tokens)
        self.mesh = mesh
        self.layout = layout
        self.calls = 0
        self.last_result: sampler.GenerateResult | None = None  # for logging (e.g. the log-prob gap)

    def image_inputs(self, images: Sequence[Sequence[Any]]) -> dict[str, np.ndarray]:
        """Mllama arrays for per-context image lists ({} when no context has an image)."""
        if not any(len(imgs) for imgs in images):
            return {}
        if self.image_processor is None:
            raise UserError("contexts carry images but the policy has no image_processor (a text-only model?)")
        arrays = self.image_processor([list(imgs) for imgs in images])
        return {k: arrays[k] for k in model_logprobs.PIXEL_KEYS}

    def __call__(
        self, contexts: Sequence[Sequence[int]], images: Sequence[Sequence[Any]] | None = None
    ) -> list[tuple[list[int], list[float]]]:
        images = [[] for _ in contexts] if images is None else images
        if len(images) != len(contexts):
            raise UserError(f"{len(contexts)} contexts but {len(images)} image lists")
        seed = (self.seed * 1_000_003 + self.calls) % 2**31
        self.calls += 1
        result = sampler.generate(
            self.model,
            contexts,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop_tokens=self.stop_tokens,
            seed=seed,
            pad_id=self.tokenizer.pad_id,
            mesh=self.mesh,
            layout=self.layout,
            **self.image_inputs(images),
        )
        self.last_result = result
        return [
            (list(map(int, row[:n])), [float(x) for x in lp[:n]])
            for row, lp, n in zip(result.tokens, result.logprobs_temperature, result.lengths)
        ]


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    """The `sampling:` section of a run config. `temperature` is the run's one temperature: the
    sampler draws at it and the RL losses score log-probs at logits / temperature, so the first
    update's ratio starts at 1 (there is no per-algorithm temperature)."""

    max_new_tokens: int = 512  # paper: 512 during RL
    temperature: float = 0.2  # paper: 0.2
    top_p: float = 1.0
    top_k: int = 0
    # "decode": prefill and decode tensor-parallel over the mesh (weights resharded once per parameter
    # version); "train": in the training (FSDP) layout, every program all-gathering the weights;
    # "auto": decode where fsdp x tensor divides the heads and MLP width (`sampler.resolve_layout`)
    layout: str = "auto"

    def __post_init__(self):
        from sftrl_jax.config import ConfigError, check_ranges

        check_ranges(self, max_new_tokens="[1, 1048576]", temperature="[0, inf)", top_p="(0, 1]", top_k="[0, inf)")
        if self.layout not in sampler.LAYOUTS:
            raise ConfigError(f"sampling.layout must be one of {', '.join(sampler.LAYOUTS)}; got {self.layout!r}")


def make_policy(model, tokenizer, cfg: SamplingSection, *, seed: int, image_processor=None, temperature=None):
    """The sampler as a rollout policy with `cfg`'s settings (`temperature` overrides cfg's: 0 = greedy
    evaluation)."""
    return Policy(
        model,
        tokenizer,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        seed=seed,
        image_processor=image_processor,
        layout=cfg.layout,
    )

"""Turns -> padded training arrays, and the micro-batch layout of the RL passes.

Both learners train on the same arrays (`build_batch`: right-padded [B, L] rows of context +
response, targets and masks at the response tokens) and run their no-gradient passes (PPO's values,
GRPO's old log-probs, the KL reference) through `Batcher.rows_of`, which replays the first
optimiser step's batch layout so that those passes compute the same bits as that step's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from sftrl_jax.config import ConfigError
from sftrl_jax.data import rows
from sftrl_jax.episodes import Turn
from sftrl_jax.models import logprobs
from sftrl_jax.parallel import placement
from sftrl_jax.rl import losses

# The arrays that go to the device (the rest of a built batch stays on the host).
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "targets",
    "resp_mask",
    "weights",
    "old_token_logp",
    "value_index",
    "old_values",
    "advantages",
    "returns",
    "ref_token_logp",
    "sampler_token_logp",
    *logprobs.IMAGE_KEYS,
)


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
    raise ConfigError(f"an RL sample of {n} tokens exceeds the largest length bucket {buckets[-1]}")


def padded_length(turns: Sequence[Turn], buckets: Sequence[int]) -> int:
    """L of `build_batch`'s rows for turns: the smallest bucket that holds the longest context + response."""
    return pad_length(max(len(t.context_ids) + len(t.response_ids) for t in turns), buckets)


def build_batch(
    turns: Sequence[Turn],
    tokenizer,
    cfg,
    *,
    buckets: Sequence[int],
    image_processor=None,
    max_images: int = 1,
) -> dict[str, np.ndarray]:
    """Right-padded [B, L] arrays for the training forward: `input_ids`, `attention_mask`, `targets`
    (the next token at response positions, 0 elsewhere), `resp_mask` (1 where the target is a
    response token), `weights` (`cfg.thought_coef` before the action key `cfg.action_keys`, 1 after:
    PPO's turn log-prob), `value_index` [B] (last prompt token), `old_token_logp` [B, L] (sampler
    log-probs, aligned with targets); plus Mllama image arrays when `image_processor` is given."""
    seqs = [list(t.context_ids) + list(t.response_ids) for t in turns]
    L = padded_length(turns, buckets)
    # Targets only where a response token is predicted (position c - 1 predicts the first): prompt
    # positions are never scored, and one of them predicts <|image|>, which is outside the output
    # vocabulary of Mllama (an extra embedding row), so its log-prob would be a NaN gather that
    # poisons masked sums and grads.
    at = [len(t.context_ids) - 1 for t in turns]
    responses = [list(t.response_ids) for t in turns]
    batch = rows.right_padded(seqs, length=L, pad_id=tokenizer.pad_id)
    batch["targets"] = rows.place(responses, at, length=L)
    per_token = {
        "resp_mask": [[1.0] * len(r) for r in responses],
        "weights": [_weights(tokenizer, r, cfg) for r in responses],
        "old_token_logp": [t.logprobs[: len(r)] for t, r in zip(turns, responses)],
    }
    batch |= {k: rows.place(v, at, length=L, dtype=np.float32) for k, v in per_token.items()}
    batch["value_index"] = np.array(at, np.int32)
    if image_processor is not None:
        batch |= rows.image_inputs(
            seqs,
            [t.images for t in turns],
            image_processor=image_processor,
            image_token_id=tokenizer.image_token_id,
            length=L,
            max_images=max_images,
        )
    return batch


def batch_spec(rows: int, length: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of `build_batch`'s text arrays for `rows` turns padded to `length`: what
    `sftrl plan` compiles the training passes at (tests/rl/test_batching.py checks it against a
    built batch)."""
    spec = {k: ((rows, length), np.dtype(np.int32)) for k in ("input_ids", "attention_mask", "targets")}
    spec |= {k: ((rows, length), np.dtype(np.float32)) for k in ("resp_mask", "weights", "old_token_logp")}
    spec["value_index"] = ((rows,), np.dtype(np.int32))
    return spec


def _weights(tokenizer, response_ids: list[int], cfg) -> np.ndarray:
    """[R]: `cfg.thought_coef` on the thought tokens (before `action_start`), 1 on the action's."""
    start = action_start(tokenizer, response_ids, cfg.action_keys)
    return np.where(np.arange(len(response_ids)) < start, cfg.thought_coef, 1.0)


def response_row(turn: Turn, row: np.ndarray) -> np.ndarray:
    """The response tokens' entries of a [L] row aligned with `targets` (position c - 1 predicts the
    first response token)."""
    c = len(turn.context_ids)
    return row[c - 1 : c - 1 + len(turn.response_ids)].astype(np.float32)


def put_token_logp(batch: dict[str, np.ndarray], key: str, turns: Sequence[Turn], table: dict[int, np.ndarray]):
    """batch[key] [B, L]: each turn's response token log-probs from `table` (id(turn) -> [R]),
    aligned with targets."""
    old = batch["old_token_logp"]
    at = [len(t.context_ids) - 1 for t in turns]
    batch[key] = rows.place([table[id(t)] for t in turns], at, length=old.shape[1], dtype=old.dtype)


def sampler_agreement(turns: Sequence[Turn], trainer_logps: Sequence[np.ndarray]) -> dict[str, float]:
    """`losses.sampler_agreement` over every response token of turns: the trainer's token log-probs at
    the rollout's parameters (each turn's [R]) against the sampler's own."""
    trainer = np.concatenate([np.asarray(lp, np.float32) for lp in trainer_logps] or [np.zeros(0, np.float32)])
    sampler = np.concatenate(
        [np.asarray(t.logprobs[: len(lp)], np.float32) for t, lp in zip(turns, trainer_logps)] or [trainer]
    )
    return {k: float(v) for k, v in losses.sampler_agreement(trainer, sampler).items()}


def token_gap(turns: Sequence[Turn], trainer_logps: Sequence[np.ndarray]) -> float:
    """max |trainer - sampler| over the response tokens of turns (the sampler's own log-probs)."""
    return max(
        (
            float(np.abs(lp - np.asarray(t.logprobs[: len(lp)], np.float32)).max())
            for t, lp in zip(turns, trainer_logps)
            if len(lp)
        ),
        default=0.0,
    )


def epoch_steps(order: np.ndarray, S: int) -> list[list[int]]:
    """One epoch's optimiser steps over the shuffled `order`: chunks of S; a partial last chunk is
    dropped (its turns are in the next shuffle's steps), unless it is the only one: then it is
    repeated up to S (the caller gives the repeats zero weight)."""
    order = [int(i) for i in order]
    steps = [order[s : s + S] for s in range(0, len(order), S)]
    if len(steps) > 1 and len(steps[-1]) < S:
        steps.pop()
    return [(idx * (S // len(idx) + 1))[:S] for idx in steps]


class Batcher:
    """Builds batches of turns with the run's tokenizer, length buckets and image processor, and
    puts them on the mesh."""

    def __init__(self, tokenizer, mesh, cfg, *, buckets: Sequence[int], image_processor=None):
        self.tokenizer, self.mesh, self.cfg = tokenizer, mesh, cfg
        self.buckets = tuple(buckets)
        self.image_processor = image_processor

    def build(self, turns: Sequence[Turn]) -> dict[str, np.ndarray]:
        return build_batch(turns, self.tokenizer, self.cfg, buckets=self.buckets, image_processor=self.image_processor)

    def device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The device arrays of a built batch (`BATCH_KEYS`), sharded over the batch axes."""
        host = {k: v for k, v in batch.items() if k in BATCH_KEYS}
        # every process holds every turn (`episodes`): each device takes its rows of the whole batch
        return placement.replicated_batch(host, self.mesh)

    def rows_of(
        self, turns: Sequence[Turn], mb: int, fn: Callable[[dict[str, jax.Array]], Any], steps=None
    ) -> list[tuple[np.ndarray, ...]]:
        """fn(device micro-batch) -> arrays with a leading row axis; returns each turn's rows.

        `steps` (lists of indices into `turns`, each a multiple of `mb` long) are the optimiser steps
        of the first epoch: each is built as one padded batch and cut into micro-batches exactly as
        the update step does, so this forward sees every turn in the layout (companions, padded
        length, row) of the first step's forward and computes the same bits: the first step's ratio
        is 1 and its reference KL 0, not just 1 and 0 up to fp32 rounding. Turns in no step follow
        in chunks of `mb` (the last one padded with copies of its last turn)."""
        out: list = [None] * len(turns)
        layout = [[int(i) for i in s] for s in steps or []]
        covered = {i for s in layout for i in s}
        rest = [i for i in range(len(turns)) if i not in covered]
        for lo in range(0, len(rest), mb):
            chunk = rest[lo : lo + mb]
            layout.append(chunk + [chunk[-1]] * (mb - len(chunk)))
        for idx in layout:
            batch = self.build([turns[i] for i in idx])
            for lo in range(0, len(idx), mb):
                res = fn(self.device({k: v[lo : lo + mb] for k, v in batch.items()}))
                res = [placement.to_host(r) for r in res]
                for r, i in enumerate(idx[lo : lo + mb]):
                    if out[i] is None:
                        out[i] = tuple(x[r] for x in res)
        return out

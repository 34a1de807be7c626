"""`device_reward_fn(task, tokenizer)`: the env's reward of a turn, jit-compiled over token ids.

    fn = device_reward_fn("gp-l", tokenizer)
    state = stack_states([env.device_state() for env in envs])      # leading batch axis
    rewards = jax.jit(fn)(response_ids, lengths, state)             # [B] float32
    rewards, outcomes = jax.jit(fn.with_outcome)(response_ids, lengths, state)

`response_ids` [B, L] int32 are the sampled ids (the first `lengths` [B] count; special tokens such as
the stop token add no text, as `tokenizer.decode` skips them), `state` the stacked
`env.device_state()` of each row's env before its `step`. The reward equals what `env.step(text)`
returns for `text = tokenizer.decode(ids)` on every row the device decides; `fn.outcomes` names the
outcome codes (GP: the verifier's OUTCOMES; V-IRL: correct, incorrect_action, incorrect_observation,
exceeded; then `device_text.HOST_OUTCOMES`, JSON_TOO_DEEP and DID_NOT_FIT: rows left to the host,
whose reward here is not the host's). The host verifiers stay the reference and keep writing the
feedback text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sftrl_jax.envs import device_text
from sftrl_jax.envs.base import EnvError

TASKS = ("gp-l", "gp-vl", "virl-l", "virl-vl")


def device_reward_fn(task: str, tokenizer, *, max_bytes: int | None = None):
    """The jittable reward of `task` over token ids of `tokenizer` (see the module docstring)."""
    if task not in TASKS:
        raise EnvError(f"no device reward for task {task!r}; tasks: {', '.join(TASKS)}")
    table = device_text.byte_table(tokenizer)
    if task.startswith("gp-"):
        from sftrl_jax.envs.general_points import device_reward as task_reward
    else:
        from sftrl_jax.envs.virl import device_reward as task_reward
    return device_text.ByteReward(table, task_reward.score_bytes, task_reward.OUTCOMES, max_bytes=max_bytes)


def stack_states(states: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-env `device_state()` dicts -> one dict of arrays with a leading batch axis."""
    if not states:
        raise ValueError("no states to stack")
    return {k: np.stack([s[k] for s in states]) for k in states[0]}

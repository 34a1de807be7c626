"""The RL rollout's rewards on the device (`env.reward_on_device`): `DeviceScorer` for `EpisodeRunner`.

    scorer = DeviceScorer("gp-l", tokenizer, width=max_new_tokens)
    rows = scorer.score([scorer.state_of(env) for env in envs], responses)  # before env.step
    rows[k]  # (reward, outcome name), or None: the host's reward

Right after a turn's sampling, the runner hands the scorer the sampled ids of the envs it steps
(its own share with several processes) and their `device_state()` taken before `env.step`; one
jit-compiled `device_reward_fn(task).with_outcome` scores them (ids padded to `width` columns, rows
to `batch`, so one shape per run and one compile per process: the jitted function is cached per task
and byte table). The host's `env.step(text)` still runs for the feedback text and the env's advance,
and its reward is the one trained on: the runner counts and logs rows where the device's differs (it
must not). A row is left to the host (None) when its response did not fit the byte budget
(DID_NOT_FIT), its JSON nests deeper than the device reads (JSON_TOO_DEEP, where Python's recursion
limit decides), or its env's `device_state()` refuses (e.g. a GP hand with more solution strings than
the table holds).

`refusal(task, options)` names the env option the device reward cannot do; `resolve(flag, ...)`
turns the config's `env.reward_on_device` (None = auto: on where the device reward equals the host
verifier on everything tested, i.e. every task with options it implements) into on / off.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sftrl_jax.config import ConfigError
from sftrl_jax.envs import device_text
from sftrl_jax.envs.device_reward import TASKS, device_reward_fn, stack_states
from sftrl_jax.errors import UserError

# GeneralPoints options the device reward does not implement: option -> (default, why)
_GP_UNSUPPORTED = {
    "exact": (True, "exact=False (the reference's float ==) is host-only"),
    "reference_card_parsing": (False, "reference_card_parsing=True (the reference's card parsing) is host-only"),
    "repeat_penalty": (0.0, "repeat_penalty != 0 (ours, it needs the episode's earlier answers) is host-only"),
}
_JITTED: dict[tuple, Any] = {}  # (task, byte table digest, max_bytes) -> jitted with_outcome


def refusal(task: str, options: dict[str, Any]) -> str | None:
    """Why the device reward cannot score `task` with env `options` (None: it can)."""
    if task not in TASKS:
        return f"env.task {task!r} has no device reward (tasks: {', '.join(TASKS)})"
    if task.startswith("gp-"):
        for key, (default, why) in _GP_UNSUPPORTED.items():
            if key in options and options[key] != default:
                return f"env.options.{key}: {why}"
    return None


def resolve(flag: bool | None, task: str, options: dict[str, Any]) -> bool:
    """`env.reward_on_device` -> on / off; an explicit true the options forbid is a ConfigError."""
    why = refusal(task, options)
    if flag is None:
        return why is None
    if flag and why is not None:
        raise ConfigError(f"env.reward_on_device is true but {why}: set env.reward_on_device false (or drop it)")
    return bool(flag)


def make_scorer(flag: bool | None, task: str, options: dict[str, Any], tokenizer, *, width: int):
    """The run's scorer, or None when the device reward is off (auto: also for a tokenizer that is
    not byte-level BPE; an explicit true then fails with the tokenizer's message)."""
    if not resolve(flag, task, options):
        return None
    try:
        return DeviceScorer(task, tokenizer, width=width)
    except UserError:
        if flag is None:
            return None
        raise


def _jitted(task: str, fn) -> Any:
    import jax

    t = fn.table
    digest = hashlib.sha1(t.table.tobytes() + t.lengths.tobytes()).hexdigest()
    key = (task[:3], digest, t.table.shape, fn.max_bytes)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(fn.with_outcome)
    return _JITTED[key]


class DeviceScorer:
    """Scores a turn's responses with the jitted device reward (see the module docstring)."""

    def __init__(self, task: str, tokenizer, *, width: int):
        self.task = task
        self.fn = device_reward_fn(task, tokenizer)
        self.width = int(width)
        self.host_codes = {self.fn.outcomes.index(o) for o in device_text.HOST_OUTCOMES}
        self._run = _jitted(task, self.fn)
        self.calls = 0  # batches scored
        self.rows = 0  # rows scored on the device
        self.seconds = 0.0  # wall time of the device scoring (states, transfer, compiled program)

    @staticmethod
    def state_of(env) -> dict[str, np.ndarray] | None:
        """`env.device_state()` before its step, or None where it refuses (the host scores that row)."""
        try:
            return env.device_state()
        except Exception:
            return None

    def score(
        self, states: Sequence[dict[str, np.ndarray] | None], responses: Sequence[Sequence[int]], *, batch: int = 0
    ) -> list[tuple[float, str] | None]:
        """(reward, outcome name) per row; None where the host must score (no state, HOST_OUTCOMES).
        Rows are padded to `batch` (and ids to `width` columns) so each run compiles once."""
        t0 = time.perf_counter()
        out: list[tuple[float, str] | None] = [None] * len(responses)
        live = [k for k, s in enumerate(states) if s is not None]
        if live:
            L = max(self.width, *(len(responses[k]) for k in live))
            B = max(batch, len(live))
            ids = np.zeros((B, L), np.int32)
            lengths = np.zeros((B,), np.int32)
            for row, k in enumerate(live):
                ids[row, : len(responses[k])] = responses[k]
                lengths[row] = len(responses[k])
            rows = [states[k] for k in live]
            stacked = stack_states(rows + [rows[0]] * (B - len(rows)))
            rewards, codes = (np.asarray(x) for x in self._run(ids, lengths, stacked))
            for row, k in enumerate(live):
                if int(codes[row]) not in self.host_codes:
                    out[k] = (float(rewards[row]), self.fn.outcomes[int(codes[row])])
            self.calls += 1
            self.rows += sum(r is not None for r in out)
        self.seconds += time.perf_counter() - t0
        return out

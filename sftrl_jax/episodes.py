"""Multi-turn episodes with sequential revision, run for many environments in lock-step.

Each turn, every active environment's chat context (first prompt, earlier answers, verifier
feedback) is tokenised, all contexts are sampled in ONE batched policy call, the answers are scored
by the envs, and the conversations are updated:

- episode over (terminated or truncated): the env is reset and a fresh conversation starts;
- `info["new_conversation"]` (V-IRL after a correct action): the next prompt replaces the chat;
- otherwise (a failed attempt): the answer is appended as an assistant turn and `obs["text"]`
  (the env's "You failed this trial because ..." feedback) as the next user turn.

The image of an observation goes first in the user message that carries it (only the first turn of
a conversation). A policy is any callable `policy(contexts, images) -> [(response_ids, logprobs)]`
(`sftrl_jax.sampling` provides one over a model); evaluation and PPO/GRPO rollouts share this code,
so it sits beside both (`evaluation` and `rl` import it; it imports neither).

Several processes (multi-host): env i belongs to process i % process_count, and only its owner calls
its `reset` / `step` (the host-side work: verification, rewards, rendering). What those calls
return (observation, reward, flags, the info keys kept) is exchanged every turn by one pickled
all-gather, so every process holds the same conversations of all envs, builds the same prompt batch
for the one global sampling program and numbers episodes as a single process would. An env that
fails on its owner stops every process with the owner's message.

Rewards on the device (`scorer`, an `envs.device_scoring.DeviceScorer`; `env.reward_on_device`):
right after sampling, each process scores its own envs' responses in one compiled program from
their `device_state()` taken before `step`; `step` still runs for the feedback text and the env's
advance. The turn's reward is always the host verifier's, the reference: `info["reward_source"]` is
"device" where the device's reward equals it, "host" for a row the device left to the host or
scored differently. A difference (it must not happen: issue #32's gamed answers did) sets
`info["reward_device_mismatch"]` and `info["reward_device"]` (the device's value) and logs a warning
naming env, episode, turn, both rewards and the clipped answer; the keys travel with the turn's
exchanged result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from sftrl_jax.episode_checks import RolloutError, check_observation, check_step, clip, describe, env_name
from sftrl_jax.errors import UserError
from sftrl_jax.parallel import distributed

__all__ = ["EpisodeRunner", "RolloutError", "Turn", "check_observation", "collect", "run_episodes"]

log = logging.getLogger(__name__)


class Policy(Protocol):
    def __call__(
        self, contexts: Sequence[Sequence[int]], images: Sequence[Sequence[Any]]
    ) -> Sequence[tuple[Sequence[int], Sequence[float]]]: ...


@dataclasses.dataclass
class Turn:
    """One model generation and its outcome (one PPO sample)."""

    env_index: int
    episode: int  # global episode number (unique over the run)
    turn: int  # 0-based index of this generation within its episode
    context_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    text: str
    reward: float
    terminated: bool
    truncated: bool
    images: list[Any]
    info: dict[str, Any]

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    @property
    def solved(self) -> bool:
        """The turn ended its episode with a positive reward (the task was solved)."""
        return self.terminated and self.reward > 0


def _user(text: str, image: Any) -> dict[str, Any]:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


_INFO_KEYS = (
    "verify_message",
    "outcome",
    "is_success",
    "gt_action",
    "cards",
    "numbers",
    "route_idx",
    "waypoint_idx",
    "repeated",
    "reward_source",  # with a device scorer: "device" (it equals the host's) or "host"
    "reward_device_mismatch",  # the device's reward differed from the host's (trained: the host's)
    "reward_device",  # with a mismatch: the device's reward (not trained on)
)
_SHARED_INFO = (*_INFO_KEYS, "new_conversation")  # what other processes need of a non-owned env's info


class EpisodeRunner:
    """Steps E environments in lock-step; `reset_fn(env_index, episode) -> (seed, options)` picks episodes."""

    def __init__(
        self,
        envs: Sequence[Any],
        tokenizer: Any,
        policy: Policy,
        *,
        reset_fn: Callable[[int, int], tuple[int | None, dict[str, Any] | None]] | None = None,
        max_turns: int | None = None,
        share: tuple[int, int] | None = None,
        scorer: Any = None,
    ):
        self.envs = list(envs)
        # (this process, processes): env i is reset and stepped by process i % processes only
        self.rank, self.world = distributed.process_share() if share is None else share
        self.tokenizer = tokenizer
        self.policy = policy
        self.reset_fn = reset_fn or (lambda i, ep: (ep, None))
        self.max_turns = max_turns  # end every episode after this many turns (e.g. 1: verification off)
        self.scorer = scorer  # rewards on the device (module docstring); None: the envs' step rewards
        self.next_episode = 0
        self.messages: list[list[dict[str, Any]] | None] = [None] * len(self.envs)
        self.images: list[list[Any]] = [[] for _ in self.envs]
        self.episode: list[int] = [-1] * len(self.envs)
        self.turn: list[int] = [0] * len(self.envs)
        self.active: list[bool] = [True] * len(self.envs)
        # The current episode of each env as its reset arguments + the answers given so far: enough to
        # rebuild env and conversation exactly (`state` / `load_state`).
        self.reset_args: list[tuple[int | None, dict[str, Any] | None] | None] = [None] * len(self.envs)
        self.history: list[list[tuple[str, float]]] = [[] for _ in self.envs]

    def owns(self, i: int) -> bool:
        return i % self.world == self.rank

    def _exchange(self, local: dict[int, tuple[bool, Any]]) -> dict[int, Any]:
        """{env: (ok, value or exception)} of this process's envs -> {env: value} of all processes'
        (one all-gather with several processes); an env's failure is raised on every process."""
        merged = dict(local)
        if self.world > 1:
            shared = {i: (ok, v if ok else f"{describe(v)}") for i, (ok, v) in local.items()}
            for part in distributed.allgather_objects(shared):
                for i, item in part.items():
                    merged.setdefault(i, item)
        for i in sorted(merged):
            ok, value = merged[i]
            if not ok:
                raise (
                    value
                    if isinstance(value, BaseException)
                    else RolloutError(f"(on process {i % self.world}) {value}")
                )
        return {i: v for i, (_, v) in merged.items()}

    def _owned(self, i: int, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except Exception as e:  # raised on every process by `_exchange`
            return False, e

    def _plan(self, i: int, *, allow: bool = True) -> tuple[int, Any, Any] | None:
        """Numbers env i's next episode and picks its reset arguments (None: the env goes idle)."""
        if not allow:
            self.active[i] = False
            self.messages[i] = None
            return None
        ep = self.next_episode
        self.next_episode += 1
        seed, options = self.reset_fn(i, ep)
        self.episode[i], self.turn[i] = ep, 0
        self.reset_args[i], self.history[i] = (seed, options), []
        return i, seed, options

    def _reset_all(self, plans: Sequence[tuple[int, Any, Any]]) -> None:
        """Resets the planned envs (each on its owner) and starts their conversations."""
        local = {i: self._owned(i, lambda i=i, s=s, o=o: self._reset_env(i, s, o)) for i, s, o in plans if self.owns(i)}
        obs = self._exchange(local)
        for i, _, _ in plans:
            self._new_conversation(i, obs[i])

    def _reset_env(self, i: int, seed, options) -> dict[str, Any]:
        try:
            obs, _ = self.envs[i].reset(seed=seed, options=options)
        except Exception as e:
            raise RolloutError(f"env {i} ({env_name(self.envs[i])}) raised in reset(seed={seed}): {describe(e)}") from e
        return check_observation(obs, where=f"env {i} ({env_name(self.envs[i])}) reset(seed={seed})")

    def _step_env(self, i: int, text: str):
        where = f"env {i} ({env_name(self.envs[i])}) step at episode {self.episode[i]} turn {self.turn[i]}"
        try:
            out = self.envs[i].step(text)
        except Exception as e:
            raise RolloutError(f"{where} raised while scoring the answer {clip(text)!r}: {describe(e)}") from e
        return check_step(out, where=where)

    def _new_conversation(self, i: int, obs: dict[str, Any]) -> None:
        image = obs.get("image")
        self.messages[i] = [_user(obs["text"], image)]
        self.images[i] = [image] if image is not None else []

    def contexts(self) -> list[tuple[int, list[int]]]:
        """(env index, context ids) of every active env, starting episodes where needed."""
        self._reset_all([self._plan(i) for i in range(len(self.envs)) if self.active[i] and self.messages[i] is None])
        return [
            (i, self.tokenizer.chat_ids(self.messages[i], add_generation_prompt=True))
            for i in range(len(self.envs))
            if self.active[i]
        ]

    def _device_rewards(self, idx: Sequence[int], responses: Sequence[list[int]]) -> dict[int, Any]:
        """{env: (reward, outcome) or None (host)} of this process's envs, scored on the device."""
        if self.scorer is None:
            return {}
        mine = [(i, r) for i, r in zip(idx, responses) if self.owns(i)]
        states = [self.scorer.state_of(self.envs[i]) for i, _ in mine]
        rows = self.scorer.score(states, [r for _, r in mine], batch=-(-len(self.envs) // self.world))
        return {i: row for (i, _), row in zip(mine, rows)}

    def _score(self, i: int, text: str, device: tuple[float, str] | None = None):
        obs, reward, terminated, truncated, info = self._step_env(i, text)
        if self.scorer is not None:  # the host's reward is trained on; the device's is checked against it
            mismatch = device is not None and float(np.float32(reward)) != device[0]  # float32 on the device
            info = {**info, "reward_source": "device" if device is not None and not mismatch else "host"}
            if device is not None:
                info["reward_device_mismatch"] = mismatch
            if mismatch:
                info["reward_device"] = device[0]
                log.warning(
                    "device reward mismatch: env %d (%s) episode %d turn %d: host %r (trained on), device %r "
                    "(%s); answer %r",
                    i, env_name(self.envs[i]), self.episode[i], self.turn[i], float(reward), device[0],
                    device[1], clip(text, 200),
                )  # fmt: skip
        if self.world > 1:
            info = {k: info[k] for k in _SHARED_INFO if k in info}
        return obs, reward, terminated, truncated, info

    def step(self, *, start_new: Callable[[], bool] = lambda: True) -> list[Turn]:
        """One batched generation for all active envs; returns their turns."""
        ctx = self.contexts()
        if not ctx:
            return []
        idx = [i for i, _ in ctx]
        outputs = self.policy([c for _, c in ctx], [self.images[i] for i in idx])
        if len(outputs) != len(ctx):
            raise ValueError(f"policy returned {len(outputs)} responses for {len(ctx)} contexts")
        responses = [[int(t) for t in response] for response, _ in outputs]
        texts = [self.tokenizer.decode([t for t in r if t not in self.tokenizer.stop_ids]) for r in responses]
        device = self._device_rewards(idx, responses)
        scored = self._exchange(
            {
                i: self._owned(i, lambda i=i, x=x: self._score(i, x, device.get(i)))
                for i, x in zip(idx, texts)
                if self.owns(i)
            }
        )
        turns, plans = [], []
        for (i, context), (_, logprobs), response, text in zip(ctx, outputs, responses, texts):
            obs, reward, terminated, truncated, info = scored[i]
            turns.append(
                Turn(
                    env_index=i,
                    episode=self.episode[i],
                    turn=self.turn[i],
                    context_ids=list(context),
                    response_ids=response,
                    logprobs=[float(x) for x in logprobs],
                    text=text,
                    reward=float(reward),
                    terminated=bool(terminated),
                    truncated=bool(truncated),
                    images=list(self.images[i]),
                    info={k: info[k] for k in _INFO_KEYS if k in info},
                )
            )
            self.turn[i] += 1
            if self.max_turns is not None and self.turn[i] >= self.max_turns and not (terminated or truncated):
                truncated = turns[-1].truncated = True
            if terminated or truncated:
                self.messages[i] = None
                plans.append(self._plan(i, allow=start_new()))
            else:
                self._continue(i, text, reward, obs, info)
        self._reset_all([p for p in plans if p is not None])
        return turns

    def _continue(self, i: int, text: str, reward: float, obs: dict[str, Any], info: dict[str, Any]) -> None:
        """The conversation after a turn that did not end the episode."""
        self.history[i].append((text, reward))
        if info.get("new_conversation"):
            self._new_conversation(i, obs)
        else:
            self.messages[i] = [*self.messages[i], {"role": "assistant", "content": text}, _user(obs["text"], None)]

    # -- checkpointing ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state: per env its episode's reset arguments and the answers so far.

        An env's internal state (dealt hand, attempts left, RNG) is a function of its seeded reset and
        the answers it scored, so replaying them (`load_state`) rebuilds env and conversation exactly;
        this works for every deterministic env without per-env serialisation code. Episodes must be
        started with an integer seed (a `reset_fn` returning None cannot be replayed).
        """
        envs = []
        for i in range(len(self.envs)):
            live = self.active[i] and self.messages[i] is not None
            row: dict[str, Any] = {"active": self.active[i], "live": live}
            if live:
                seed, options = self.reset_args[i]
                if seed is None or isinstance(seed, bool) or not isinstance(seed, int | np.integer):
                    raise ValueError(
                        f"env {i}: its episode was reset with seed {seed!r}; only seeded episodes can be saved"
                    )
                row.update(
                    episode=self.episode[i],
                    turn=self.turn[i],
                    seed=int(seed),
                    options=options,
                    texts=[t for t, _ in self.history[i]],
                    rewards=[r for _, r in self.history[i]],
                )
            envs.append(row)
        return {"next_episode": self.next_episode, "envs": envs}

    def load_state(self, state: dict[str, Any]) -> None:
        """Rebuilds envs and conversations from `state()`, checking every replayed reward."""
        rows = state["envs"]
        if len(rows) != len(self.envs):
            raise UserError(
                f"the saved rollout state has {len(rows)} envs but this run has {len(self.envs)} (env.num_envs)"
            )
        for i, row in enumerate(rows):
            self.active[i] = bool(row["active"])
            self.messages[i], self.images[i], self.history[i] = None, [], []
            if row["live"]:
                self.episode[i], self.turn[i] = int(row["episode"]), int(row["turn"])
                self.reset_args[i] = (int(row["seed"]), row["options"])
        live = [i for i, row in enumerate(rows) if row["live"]]
        done = self._exchange({i: self._owned(i, lambda i=i: self._replay(i, rows[i])) for i in live if self.owns(i)})
        for i in live:
            self.messages[i], self.images[i], self.history[i] = done[i]
        self.next_episode = int(state["next_episode"])

    def _replay(self, i: int, row: dict[str, Any]):
        """Env i's saved episode replayed on its owner: (messages, images, history) after it."""
        obs = self._reset_env(i, row["seed"], row["options"])
        self.turn[i] = 0
        self._new_conversation(i, obs)
        for text, saved in zip(row["texts"], row["rewards"]):
            obs, reward, terminated, truncated, info = self._step_env(i, text)
            if reward != saved or terminated or truncated:
                raise UserError(
                    f"resume: env {i} ({env_name(self.envs[i])}) replayed episode {row['episode']} differently "
                    f"(reward {reward} vs saved {saved}, done={terminated or truncated}); is the env deterministic "
                    "given its seed, and unchanged since the checkpoint?"
                )
            self.turn[i] += 1
            self._continue(i, text, reward, obs, info)
        if self.turn[i] != int(row["turn"]):
            raise UserError(f"resume: env {i} replayed {self.turn[i]} turns but the checkpoint says {row['turn']}")
        return self.messages[i], self.images[i], self.history[i]


def collect(runner: EpisodeRunner, n_steps: int) -> list[list[Turn]]:
    """PPO buffer: `n_steps` lock-step turns of every env -> [T][E] turns (episodes continue across calls)."""
    return [runner.step() for _ in range(n_steps)]


def run_episodes(runner: EpisodeRunner, n_episodes: int, *, progress: Any = None) -> list[Turn]:
    """Runs exactly `n_episodes` whole episodes (evaluation); envs idle once the quota is handed out."""

    def allow() -> bool:
        return runner.next_episode < n_episodes

    for i in range(len(runner.envs)):
        runner.active[i] = i < n_episodes
    turns: list[Turn] = []
    finished = 0
    while any(runner.active):
        step = runner.step(start_new=allow)
        turns.extend(step)
        done = sum(t.done for t in step)
        finished += done
        if progress is not None and done:
            progress.update(done)
    assert finished == n_episodes, (finished, n_episodes)
    return turns


def episode_table(turns: Sequence[Turn]) -> dict[int, list[Turn]]:
    """Turns grouped by episode, in turn order."""
    out: dict[int, list[Turn]] = {}
    for t in sorted(turns, key=lambda t: (t.episode, t.turn)):
        out.setdefault(t.episode, []).append(t)
    return out


def rewards_array(buffer: Sequence[Sequence[Turn]], mode: str = "env") -> tuple[np.ndarray, np.ndarray]:
    """[T][E] turns -> rewards [T, E] and dones [T, E] (truncation counts as done, as in the paper).

    `mode` "env": the environment's rewards; "success": 1 on a turn that ends its episode with a
    positive reward (solved), else 0."""
    if mode not in ("env", "success"):
        raise ValueError(f"reward mode must be 'env' or 'success', got {mode!r}")
    rewards = np.array([[t.reward if mode == "env" else float(t.solved) for t in row] for row in buffer], np.float32)
    dones = np.array([[float(t.done) for t in row] for row in buffer], np.float32)
    return rewards, dones

"""The paper's evaluation protocol (SPEC.md §1.8, §2.7, §3.6) for any policy.

    proto = protocol("gp-l", "ood-rule")            # 234 episodes, seed 42, verify_iter 5
    result = evaluate(policy, tokenizer, proto, batch_size=16, out_dir="runs/eval/gp-l-ood-rule")

GeneralPoints: 234 episodes, seed 42, 5 graded attempts with verifier feedback; success = an episode
with a correct formula. Recognition (`recognition=True`, GP-VL): one turn per episode with
`verify_iter=1` and no revision; accuracy = 1 - (turns with the -1.5 card penalty) / turns.
V-IRL: 48 routes (seed 12) for `id` / `ood-rule`, the 18 OOD-city routes in order for `ood-visual`;
2 graded attempts per waypoint; per-step accuracy and route success.

Episode i of GeneralPoints is dealt with `reset(seed=seed * 1_000_003 + i)`, so every checkpoint
sees the same 234 hands (the reference drew them from one seeded global RNG). Outputs in `out_dir`:
`turns.jsonl` (sample_id, turn, output, reward, message, ...), `summary.json`, `summary.md`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from sftrl_jax import envs, episodes
from sftrl_jax import progress as progress_lib
from sftrl_jax.errors import UserError

TASKS = ("gp-l", "gp-vl", "virl-l", "virl-vl")
EVAL_SPLITS = ("id", "ood-rule", "ood-visual")


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    task: str
    split: str
    n_episodes: int
    seed: int
    verify_iter: int
    recognition: bool = False

    @property
    def name(self) -> str:
        return f"{self.task}/{self.split}" + ("/recognition" if self.recognition else "")


def protocol(task: str, split: str, *, recognition: bool = False, n_episodes: int | None = None) -> EvalProtocol:
    """The paper's settings for `task` / `split`; `n_episodes` overrides the count (quick checks)."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if split not in EVAL_SPLITS:
        raise UserError(f"unknown eval split {split!r}; splits: {', '.join(EVAL_SPLITS)}")
    if task == "gp-l" and split == "ood-visual":
        raise UserError("gp-l has no visual variant; ood-visual applies to gp-vl and virl-vl")
    if recognition and task != "gp-vl":
        raise UserError("--recognition measures card recognition and applies to gp-vl only")
    if task.startswith("gp"):
        proto = EvalProtocol(task, split, 234, 42, 1 if recognition else 5, recognition)
    else:
        n = envs.make(task, split=split).n_routes
        proto = EvalProtocol(task, split, n, 12, 2)
    if n_episodes is not None:
        if n_episodes <= 0:
            raise UserError(f"n_episodes must be positive, got {n_episodes}")
        proto = dataclasses.replace(proto, n_episodes=n_episodes)
    return proto


def make_runner(
    policy,
    tokenizer,
    proto: EvalProtocol,
    *,
    batch_size: int,
    env_options: dict | None = None,
    make_env: Callable[[], Any] | None = None,
):
    """The episode runner of `proto`; `make_env()` builds each env instead of `envs.make` (fixed prompts:
    `prompt_set.PromptEnv`)."""
    n_envs = max(1, min(batch_size, proto.n_episodes))
    if make_env is None:
        options = {"verify_iter": proto.verify_iter, **(env_options or {})}
        make_env = lambda: envs.make(proto.task, split=proto.split, **options)  # noqa: E731
    env_list = [make_env() for _ in range(n_envs)]
    if proto.task.startswith("gp"):
        reset_fn = lambda i, ep: (proto.seed * 1_000_003 + ep, None)  # noqa: E731
    else:
        reset_fn = lambda i, ep: (proto.seed, {"route_idx": ep})  # noqa: E731
    return episodes.EpisodeRunner(
        env_list, tokenizer, policy, reset_fn=reset_fn, max_turns=1 if proto.recognition else None
    )


def summarize(proto: EvalProtocol, turns: Sequence[episodes.Turn]) -> dict[str, Any]:
    table = episodes.episode_table(turns)
    eps = list(table.values())
    out: dict[str, Any] = {
        "task": proto.task,
        "split": proto.split,
        "recognition": proto.recognition,
        "episodes": len(eps),
        "turns": len(turns),
    }
    if proto.task.startswith("gp"):
        from sftrl_jax.envs.general_points import metrics as gp

        stats = gp.EpisodeStats()
        for ep in eps:
            for k, t in enumerate(ep):
                stats.add(t.reward, t.info.get("outcome"), done=k == len(ep) - 1)
        out.update(stats.summary())
        out["success_rate"] = gp.success_rate([[t.reward for t in ep] for ep in eps])
        out["success_rate_stderr"] = gp.binomial_stderr(out["success_rate"], len(eps))
        out["recognition_accuracy"] = gp.recognition_accuracy([t.reward for t in turns])
        out["recognition_accuracy_stderr"] = gp.binomial_stderr(out["recognition_accuracy"], len(turns))
    else:
        from sftrl_jax.envs.virl import metrics as virl

        out.update(
            virl.summarize([[t.reward for t in ep] for ep in eps], [bool(ep[-1].info.get("is_success")) for ep in eps])
        )
    out["reward_mean"] = sum(t.reward for t in turns) / max(len(turns), 1)
    return out


def headline(summary: dict[str, Any]) -> tuple[str, float, float]:
    """The metric the paper reports for this task/split: (name, value, stderr)."""
    if summary["task"].startswith("gp"):
        key = "recognition_accuracy" if summary["recognition"] else "success_rate"
    elif summary["split"] == "ood-visual":
        key = "route_success_rate"
    else:
        key = "per_step_accuracy"
    return key, float(summary[key]), float(summary[f"{key}_stderr"])


def markdown(summary: dict[str, Any]) -> str:
    key, value, err = headline(summary)
    rows = [
        f"| {summary['task']} | {summary['split']} | {key} | {100 * value:.1f}% ± {100 * err:.1f} | "
        f"{summary['episodes']} | {summary['turns']} |"
    ]
    return (
        "\n".join(["| task | split | metric | value ± s.e. | episodes | turns |", "|---|---|---|---|---|---|", *rows])
        + "\n"
    )


def evaluate(
    policy,
    tokenizer,
    proto: EvalProtocol,
    *,
    batch_size: int = 16,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    env_options: dict | None = None,
    make_env: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Runs the protocol with `policy` (see `episodes.Policy`); writes the files when `out_dir` is set."""
    runner = make_runner(policy, tokenizer, proto, batch_size=batch_size, env_options=env_options, make_env=make_env)
    bar = progress_lib.bar(total=proto.n_episodes, desc=f"eval {proto.name}", unit="episode", enabled=progress)
    try:
        turns = episodes.run_episodes(runner, proto.n_episodes, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(proto, turns)
    if out_dir is not None:
        write_outputs(out_dir, proto, turns, summary)
    return summary


def write_outputs(out_dir, proto: EvalProtocol, turns: Sequence[episodes.Turn], summary: dict[str, Any]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "turns.jsonl"), "w") as f:
        for t in sorted(turns, key=lambda t: (t.episode, t.turn)):
            row = {
                "sample_id": t.episode,
                "turn": t.turn,
                "output": t.text,
                "reward": t.reward,
                "message": t.info.get("verify_message"),
                "terminated": t.terminated,
                "truncated": t.truncated,
                "response_tokens": len(t.response_ids),
            }
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({**summary, "protocol": dataclasses.asdict(proto)}, f, indent=2, default=float)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(markdown(summary))

"""V-IRL metrics (SPEC.md §2.7): per-step accuracy, route success rate, binomial standard errors.

Per-step accuracy counts every model turn, retries and the ungraded over-budget turn included, and a
turn is correct when it earned +1 (the reference computes it from the reward counts). Route success
counts episodes that ended with a correct `stop()`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from sftrl_jax.envs.virl.verifier import CORRECT


def binomial_stderr(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of a rate p measured on n trials (0 for n = 0)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else 0.0


def per_step_accuracy(rewards: Iterable[float]) -> float:
    """Fraction of model turns that earned the +1 of a correct action."""
    rewards = list(rewards)
    return sum(r == CORRECT for r in rewards) / len(rewards) if rewards else 0.0


def route_success_rate(successes: Iterable[bool]) -> float:
    successes = [bool(s) for s in successes]
    return sum(successes) / len(successes) if successes else 0.0


def summarize(episode_rewards: Sequence[Sequence[float]], episode_successes: Sequence[bool]) -> dict[str, float]:
    """Both metrics with their standard errors over a batch of episodes."""
    turns = [r for ep in episode_rewards for r in ep]
    acc = per_step_accuracy(turns)
    succ = route_success_rate(episode_successes)
    return {
        "per_step_accuracy": acc,
        "per_step_accuracy_stderr": binomial_stderr(acc, len(turns)),
        "route_success_rate": succ,
        "route_success_rate_stderr": binomial_stderr(succ, len(episode_successes)),
        "n_turns": float(len(turns)),
        "n_episodes": float(len(episode_successes)),
    }

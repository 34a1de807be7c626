"""GeneralPoints metrics (SPEC §1.8): episode success, card-recognition accuracy, outcome counts.

* Episode success rate: episodes with a +5 turn / episodes ("succeeding at least once during the
  inference-time verification").
* Recognition accuracy: 1 - (turns with reward -1.5) / turns (the paper measures it with one graded
  turn per episode).
* Outcome counts per turn, named as the reference's logger names them by the turn's total reward
  (CORRECT 5, PARTIAL 1, NO_SOLUTION -1, INCORRECT_VISION -1.5, INCORRECT_NUMBER -2,
  ILLEGAL_FORMULA -3, anything else AGGREGATED_ERROR), plus STEP_LIMIT for the ungraded truncation
  turn, which the reference's logger counted as NO_SOLUTION because it also scores -1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from sftrl_jax.envs.general_points import verifier

OUTCOMES = verifier.OUTCOMES
CORRECT_REWARD = verifier.REWARDS["CORRECT"]
VISION_REWARD = verifier.REWARDS["INCORRECT_VISION"]


def binomial_stderr(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of a rate p measured on n independent trials (nan if n = 0)."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else math.nan


def success_rate(episodes: Iterable[Sequence[float]]) -> float:
    """Fraction of episodes (each a sequence of turn rewards) containing a +5 turn; nan if none."""
    flags = [any(r == CORRECT_REWARD for r in ep) for ep in episodes]
    return sum(flags) / len(flags) if flags else math.nan


def recognition_accuracy(rewards: Iterable[float]) -> float:
    """1 - (turns scored -1.5) / turns; nan if there are no turns."""
    rewards = list(rewards)
    return 1.0 - sum(r == VISION_REWARD for r in rewards) / len(rewards) if rewards else math.nan


def outcome_counts(turns: Iterable[str | float]) -> dict[str, int]:
    """Counts per outcome name (all names present). Items are outcome names (`info["outcome"]`, which
    tells STEP_LIMIT apart) or turn rewards (classified by value)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for item in turns:
        name = item if isinstance(item, str) else verifier.outcome_of(item)
        if name not in counts:
            raise ValueError(f"unknown outcome {name!r}; valid: {', '.join(OUTCOMES)}")
        counts[name] += 1
    return counts


@dataclasses.dataclass
class EpisodeStats:
    """Accumulates turns of many episodes: `add(reward, outcome, done)` after each `env.step`."""

    episodes: int = 0
    successes: int = 0
    turns: int = 0
    vision_errors: int = 0
    counts: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    _solved: bool = False

    def add(self, reward: float, outcome: str | None = None, done: bool = False) -> None:
        self.turns += 1
        self.vision_errors += reward == VISION_REWARD
        self._solved = self._solved or reward == CORRECT_REWARD
        self.counts[outcome or verifier.outcome_of(reward)] += 1
        if done:
            self.episodes += 1
            self.successes += self._solved
            self._solved = False

    def summary(self) -> dict[str, float]:
        sr = self.successes / self.episodes if self.episodes else math.nan
        ra = 1.0 - self.vision_errors / self.turns if self.turns else math.nan
        out = {
            "episodes": self.episodes,
            "turns": self.turns,
            "success_rate": sr,
            "success_rate_stderr": binomial_stderr(sr, self.episodes) if self.episodes else math.nan,
            "recognition_accuracy": ra,
            "recognition_accuracy_stderr": binomial_stderr(ra, self.turns) if self.turns else math.nan,
        }
        out.update({f"turns/{k}": v for k, v in self.counts.items()})
        return out

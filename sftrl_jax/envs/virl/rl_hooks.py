"""What an RL loop asks of V-IRL (`envs.rl_hooks("virl-l")`): its per-update statistics and how a
group of episodes shares one route. The loop itself names no task; it calls these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def turn_stats(turns: Sequence[Any]) -> dict[str, float]:
    """No V-IRL-specific statistics beyond the loop's own (reward, success, tokens)."""
    return {}


def group_reset(env, seed: int) -> tuple[int, dict[str, Any] | None]:
    """The reset arguments of every episode of a GRPO group: one route of the split, picked by the seed."""
    return seed, {"route_idx": seed % env.n_routes}

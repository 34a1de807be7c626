"""What an RL loop asks of GeneralPoints (`envs.rl_hooks("gp-l")`): its per-update statistics and
how a group of episodes shares one puzzle. The loop itself names no task; it calls these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sftrl_jax.envs.general_points import verifier


def turn_stats(turns: Sequence[Any]) -> dict[str, float]:
    """Per-update statistics of GP turns (`episodes.Turn`): how many turns got each outcome of the
    reward table (`outcome/<NAME>`, only those that occurred), and the share of graded answers that
    repeat an earlier formula of their episode (`repeated_answers`; graded = not the step-limit turn)."""
    out: dict[str, float] = {}
    for name in verifier.OUTCOMES:
        n = sum(1 for t in turns if t.info.get("outcome") == name)
        if n:
            out[f"outcome/{name}"] = n
    graded = [t for t in turns if "repeated" in t.info and t.info.get("outcome") not in (None, "STEP_LIMIT")]
    if graded:
        out["repeated_answers"] = sum(1 for t in graded if t.info["repeated"]) / len(graded)
    return out


def group_reset(env, seed: int) -> tuple[int, dict[str, Any] | None]:
    """The reset arguments of every episode of a GRPO group: the seed deals the group's hand."""
    return seed, None

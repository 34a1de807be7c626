"""What `episodes.EpisodeRunner` accepts from an environment: observations and `step` results.

Anything else stops the run with a `RolloutError` naming the env, the call and what came back (an
environment is user code: a malformed observation or a NaN reward must not reach training).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sftrl_jax.errors import UserError


class RolloutError(UserError):
    """An environment failed (raised, or returned a malformed observation / reward): the run stops."""


def env_name(env: Any) -> str:
    return getattr(env, "name", "") or type(env).__name__


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def clip(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n] + "..."


def check_observation(obs: Any, *, where: str, allow_empty: bool = False) -> dict[str, Any]:
    """An observation must be {"text": non-empty str (empty allowed once the episode is over),
    "image": None or a PIL image / HxWx3 array}; anything else stops the run with a message."""
    if not isinstance(obs, dict):
        raise RolloutError(
            f"{where} returned an observation of type {type(obs).__name__}; expected a dict with 'text' and 'image'"
        )
    if "text" not in obs:
        raise RolloutError(f"{where} returned an observation without 'text' (keys: {sorted(map(str, obs))})")
    text = obs["text"]
    if not isinstance(text, str):
        raise RolloutError(f"{where} returned observation 'text' of type {type(text).__name__}; expected str")
    if not text and not allow_empty:
        raise RolloutError(f"{where} returned an empty observation 'text' for an episode that goes on")
    image = obs.get("image")
    if image is not None:
        ok = hasattr(image, "convert") and hasattr(image, "size")  # PIL
        if isinstance(image, np.ndarray):
            ok = image.ndim == 3 and image.shape[-1] in (3, 4) and min(image.shape[:2]) > 0
        if not ok:
            desc = f"array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise RolloutError(
                f"{where} returned observation 'image' {desc}; expected None, a PIL image or an HxWx3 array"
            )
    return obs


def check_step(out: Any, *, where: str) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
    """`env.step`'s result must be (observation, finite reward, terminated, truncated, info dict)."""
    if not isinstance(out, tuple) or len(out) != 5:
        raise RolloutError(f"{where} returned {clip(repr(out))}; expected (obs, reward, terminated, truncated, info)")
    obs, reward, terminated, truncated, info = out
    check_observation(obs, where=where, allow_empty=bool(terminated or truncated))
    if not isinstance(reward, int | float | np.number) or isinstance(reward, bool) or not np.isfinite(reward):
        raise RolloutError(f"{where} returned reward {reward!r}; expected a finite number")
    if not isinstance(info, dict):
        raise RolloutError(f"{where} returned info of type {type(info).__name__}; expected a dict")
    return obs, float(reward), bool(terminated), bool(truncated), info

"""Environments: GeneralPoints (gp-l, gp-vl) and V-IRL navigation (virl-l, virl-vl).

env = sftrl_jax.envs.make("gp-l", split="ood-rule")
obs, info = env.reset(seed=0)
obs, reward, terminated, truncated, info = env.step(model_text)
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from sftrl_jax.envs.base import SPLITS, Env, EnvError, check_split
from sftrl_jax.envs.device_reward import device_reward_fn, stack_states

# name -> (module, factory function); imported lazily so `make("gp-l")` never imports V-IRL code.
_REGISTRY: dict[str, tuple[str, str]] = {
    "gp-l": ("sftrl_jax.envs.general_points.env", "make_gp_l"),
    "gp-vl": ("sftrl_jax.envs.general_points.env", "make_gp_vl"),
    "virl-l": ("sftrl_jax.envs.virl.env", "make_virl_l"),
    "virl-vl": ("sftrl_jax.envs.virl.env", "make_virl_vl"),
}

ENV_NAMES = tuple(_REGISTRY)

# name -> the env family's RL hooks (`turn_stats(turns)`, `group_reset(env, seed)`): what a training
# loop needs to know about a task, so the loop itself names none.
_RL_HOOKS: dict[str, str] = {
    "gp-l": "sftrl_jax.envs.general_points.rl_hooks",
    "gp-vl": "sftrl_jax.envs.general_points.rl_hooks",
    "virl-l": "sftrl_jax.envs.virl.rl_hooks",
    "virl-vl": "sftrl_jax.envs.virl.rl_hooks",
}


def make(name: str, split: str = "train", **options: Any) -> Env:
    """Builds the environment `name` for `split`; `options` are the env's constructor keywords."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), ENV_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EnvError(f"unknown environment {name!r}{hint}; valid names: {', '.join(ENV_NAMES)}")
    check_split(name, split)
    module, factory = _REGISTRY[name]
    return getattr(importlib.import_module(module), factory)(split=split, **options)


def rl_hooks(name: str):
    """The module of `name`'s RL hooks (see `_RL_HOOKS`)."""
    if name not in _RL_HOOKS:
        raise EnvError(f"unknown environment {name!r}; valid names: {', '.join(ENV_NAMES)}")
    return importlib.import_module(_RL_HOOKS[name])


__all__ = [
    "ENV_NAMES",
    "SPLITS",
    "Env",
    "EnvError",
    "check_split",
    "device_reward_fn",
    "make",
    "rl_hooks",
    "stack_states",
]

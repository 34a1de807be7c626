"""The environment interface shared by GeneralPoints and V-IRL (gymnasium-style, text actions).

`reset(seed=None, options=None) -> (obs, info)` and `step(text) -> (obs, reward, terminated,
truncated, info)`. `obs` is a dict: `"text"` is the user message to send now, `"image"` a PIL image
or None. Model text passed to `step` is untrusted: an env never raises on it, it scores it.
"""

from __future__ import annotations

import abc
import os
import pathlib
from typing import Any

from sftrl_jax.errors import UserError

SPLITS = ("train", "id", "ood-rule", "ood-visual")

Obs = dict[str, Any]
Info = dict[str, Any]


class EnvError(UserError):
    """A user-caused error in env construction or options (never raised for model text)."""


class Env(abc.ABC):
    """Base class: text-in, text/image-out environment with multi-turn verification."""

    name: str = ""
    split: str = "train"

    @abc.abstractmethod
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Obs, Info]: ...

    @abc.abstractmethod
    def step(self, text: str) -> tuple[Obs, float, bool, bool, Info]: ...

    def close(self) -> None:  # gymnasium compatibility
        return None


def check_split(env_name: str, split: str) -> str:
    if split not in SPLITS:
        import difflib

        close = difflib.get_close_matches(str(split), SPLITS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise EnvError(f"unknown split {split!r} for env {env_name!r}{hint}; valid splits: {', '.join(SPLITS)}")
    return split


def read_template(path: str | os.PathLike, *, what: str) -> str:
    """The text of a prompt template file (UTF-8, used verbatim); EnvError naming `what` and the file
    when it is missing or unreadable."""
    file = pathlib.Path(path).expanduser()
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EnvError(f"{what} template not found: the template file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EnvError(f"cannot read {what} template file {file}: {e}") from None

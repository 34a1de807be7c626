"""V-IRL prompt text: templates (files in `templates/`, or a user's file), action spaces, history.

Templates are `string.Template` text with these placeholders: `${instruction}` (numbered list),
`${action_space}`, `${obs_act_seq}` (the O_i / A_i history), `${output_format}` (the JSON answer
block) and, for V-IRL-VL, `${view_layout}` (which view sits where in the 2x2 grid). A user template
may use any subset; an unknown placeholder is an error naming it.
"""

from __future__ import annotations

import pathlib
import string
from collections.abc import Sequence

from sftrl_jax.envs import base
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.virl import geo

TEMPLATE_DIR = pathlib.Path(__file__).parent / "templates"
DEFAULT_TEMPLATES = {"virl-l": TEMPLATE_DIR / "virl_l.txt", "virl-vl": TEMPLATE_DIR / "virl_vl.txt"}
PLACEHOLDERS = frozenset({"instruction", "action_space", "obs_act_seq", "output_format", "view_layout"})

OUTPUT_FORMAT = """{
  "current observation": "<what you observe at your current position>",
  "current instruction": "<the instruction sentence to carry out now>",
  "action": "<one action from the action space>"
}"""

VL_OBSERVATION = "You observe an image of 4 views"

# Views of the 2x2 grid (top-left, top-right, bottom-left, bottom-right), as heading offsets from the
# agent's heading. Ours match what the prompt says; the reference's heading helper gives the diagonal
# set (SPEC.md §2.4), offered as REFERENCE_VIEW_OFFSETS.
VIEW_OFFSETS = (0.0, 90.0, 180.0, 270.0)
REFERENCE_VIEW_OFFSETS = (-135.0, -45.0, 45.0, 135.0)
_VIEW_NAMES = ("front", "front right", "right", "back right", "back", "back left", "left", "front left")
_GRID_CELLS = ("top-left", "top-right", "bottom-left", "bottom-right")


def action_space_text(absolute: bool) -> str:
    words = geo.COMPASS_WORDS if absolute else geo.RELATIVE_WORDS
    choices = ", ".join(f"'{w}'" for w in words)
    return (
        '"forward()": walk forward along the street by one step\n'
        f'"turn_direction(x)": turn to face direction x, where x is one of [{choices}]\n'
        '"stop()": stop, because you have reached the destination'
    )


def view_layout_text(offsets: Sequence[float] = VIEW_OFFSETS) -> str:
    names = [_VIEW_NAMES[int(((o + 22.5) % 360.0) // 45.0)] for o in offsets]
    return ", ".join(f"{cell}: {name} view" for cell, name in zip(_GRID_CELLS, names))


def obs_act_seq_text(observations: Sequence[str], actions: Sequence[str]) -> str:
    """`O_1: ..`/`A_1: ..` lines for the visited waypoints, ending with the current `O_n` and an empty `A_n:`."""
    if len(actions) != len(observations) - 1:
        raise ValueError("need exactly one action fewer than observations")
    lines = []
    for i, obs in enumerate(observations, start=1):
        lines.append(f"O_{i}: {obs}")
        lines.append(f"A_{i}: {actions[i - 1]}" if i <= len(actions) else f"A_{i}:")
    return "\n".join(lines)


def _read(path: str) -> string.Template:
    p = pathlib.Path(path).expanduser()
    tpl = string.Template(base.read_template(p, what="V-IRL prompt"))
    if not tpl.is_valid():
        raise EnvError(f"V-IRL prompt template {p} has a malformed '$' placeholder (write '$$' for a literal '$')")
    unknown = sorted(set(tpl.get_identifiers()) - PLACEHOLDERS)
    if unknown:
        raise EnvError(f"V-IRL prompt template {p} has unknown placeholder(s) {unknown}; known: {sorted(PLACEHOLDERS)}")
    return tpl


def load_template(variant: str, template: str | pathlib.Path | None = None) -> string.Template:
    """The template for `variant` ('virl-l' | 'virl-vl'), or the user's file `template`."""
    if template is None:
        if variant not in DEFAULT_TEMPLATES:
            raise EnvError(f"unknown V-IRL variant {variant!r}; valid: {sorted(DEFAULT_TEMPLATES)}")
        template = DEFAULT_TEMPLATES[variant]
    return _read(str(template))


def build_prompt(
    template: string.Template,
    *,
    instruction: str,
    obs_act_seq: str,
    absolute: bool,
    view_offsets: Sequence[float] = VIEW_OFFSETS,
) -> str:
    return template.substitute(
        instruction=instruction,
        action_space=action_space_text(absolute),
        obs_act_seq=obs_act_seq,
        output_format=OUTPUT_FORMAT,
        view_layout=view_layout_text(view_offsets),
    )

"""Grading one V-IRL answer (SPEC.md §2.6). Pure functions over strings; never raises on model text.

    +1    the parsed "action" equals the ground-truth action exactly             ("Correct action")
    -1.5  wrong action, and the answer's "current observation" disagrees with the ground truth about
          being at an intersection                                        ("you are not at any intersection...")
    -1    any other wrong answer, including unparsable text                  ("you make incorrect action...")
    -1    a call beyond the per-waypoint budget, not graded (the env truncates) ("Exceed maximum verify steps")

The -1.5 check, by default, reproduces the reference: the ground truth it compares with is the
waypoint's *landmark* text, which never mentions an intersection, so any wrong answer whose observation
says "intersection" gets -1.5 and "you are not at any intersection", even at an intersection.
`fix_intersection_check=True` compares with the full observation ("<landmark>; You observe an
intersection" at intersections) instead, so the penalty and message are right in both directions.
The word test is case-insensitive.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from sftrl_jax.envs.virl.prompts import OUTPUT_FORMAT

CORRECT = 1.0
INCORRECT_ACTION = -1.0
INCORRECT_OBSERVATION = -1.5
INCORRECT_INSTRUCTION = -1.75  # defined by the reference, never given
EXCEEDED = -1.0

KEYS = ("current observation", "current instruction", "action")
CORRECT_MESSAGE = "Correct action"
EXCEEDED_MESSAGE = "Exceed maximum verify steps"
_WRONG_ACTION = "you make incorrect action. Please avoid this action and try again in the same format:\n"
_NOT_AT = "you are not at any intersection. Please avoid this observation and try again in the same format:\n"
_AT = "you are at an intersection. Please avoid this observation and try again in the same format:\n"

_MAX_JSON_TRIES = 16  # bounds the work on adversarial text full of '{'


@dataclasses.dataclass(frozen=True)
class Verdict:
    reward: float
    message: str
    kind: str  # correct | incorrect_action | incorrect_observation | exceeded
    action: str | None  # the parsed "action", None if absent
    observation: str | None  # the parsed "current observation"

    @property
    def correct(self) -> bool:
        return self.kind == "correct"


def _from_object(obj: Any) -> dict[str, str | None] | None:
    if not isinstance(obj, dict) or not any(k in obj for k in KEYS):
        return None
    return {k: (obj[k] if isinstance(obj.get(k), str) else None) for k in KEYS}


def _regex(key: str) -> re.Pattern:
    return re.compile(r'"' + re.escape(key) + r'"\s*:\s*"((?:[^"\\]|\\.)*)"')


_KEY_RES = {k: _regex(k) for k in KEYS}


def parse_answer(text: Any) -> dict[str, str | None]:
    """The three answer fields of a model reply: JSON first (the whole text, then the first objects
    embedded in it, e.g. inside a code fence), then a per-key regex. Missing fields are None."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    try:
        parsed = _from_object(json.loads(text))
        if parsed is not None:
            return parsed
    except (ValueError, RecursionError):
        pass
    decoder = json.JSONDecoder()
    start = text.find("{")
    tries = 0
    while start != -1 and tries < _MAX_JSON_TRIES:
        tries += 1
        try:
            obj, _ = decoder.raw_decode(text, start)
            parsed = _from_object(obj)
            if parsed is not None:
                return parsed
        except (ValueError, RecursionError):
            pass
        start = text.find("{", start + 1)
    out: dict[str, str | None] = {}
    for key, pattern in _KEY_RES.items():
        m = pattern.search(text)
        if m is None:
            out[key] = None
            continue
        try:
            out[key] = json.loads(f'"{m.group(1)}"')
        except ValueError:
            out[key] = m.group(1)
    return out


def verify(
    text: Any,
    *,
    gt_action: str,
    gt_landmark_obs: str,
    gt_observation: str,
    fix_intersection_check: bool = False,
    reminder: str = OUTPUT_FORMAT,
) -> Verdict:
    """Grades one answer against a waypoint (see the module docstring for the table)."""
    fields = parse_answer(text)
    action, observation = fields["action"], fields["current observation"]
    if action is not None and action == gt_action:
        return Verdict(CORRECT, CORRECT_MESSAGE, "correct", action, observation)
    truth = gt_observation if fix_intersection_check else gt_landmark_obs
    says = "intersection" in (observation or "").lower()
    is_at = "intersection" in truth.lower()
    if says and not is_at:
        return Verdict(INCORRECT_OBSERVATION, _NOT_AT + reminder, "incorrect_observation", action, observation)
    if is_at and not says:
        return Verdict(INCORRECT_OBSERVATION, _AT + reminder, "incorrect_observation", action, observation)
    return Verdict(INCORRECT_ACTION, _WRONG_ACTION + reminder, "incorrect_action", action, observation)


def exceeded(text: Any = None) -> Verdict:
    """The verdict of a call beyond the budget: -1, not graded."""
    return Verdict(EXCEEDED, EXCEEDED_MESSAGE, "exceeded", None, None)

"""Prompt text of GeneralPoints: templates with named fields, the face-card rule, the feedback turn.

Templates are text files in Python `str.format` syntax with named fields only (literal braces doubled):
`{target_number}`, `{face_card_msg}` and, for the text variant only, `{cards}`. Ours live in
`templates/` and are written in our own words with the reference's sections ([Task Description],
[Input] for gp-l, [Output]) and its answer layout. To evaluate checkpoints trained on the reference's
exact wording, save that wording to a file and pass `template=PATH`: the file is used verbatim.
Templates are filled with `str.format_map` after a field check, never evaluated.
"""

from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Sequence
from pathlib import Path

from sftrl_jax.envs import base
from sftrl_jax.envs.base import EnvError

TEMPLATE_DIR = Path(__file__).parent / "templates"
# The compact GP-L wording (~90 tokens instead of ~220) for CPU-sized models: same fields and format.
SHORT_TEMPLATE = TEMPLATE_DIR / "gp_l_short.txt"
DEFAULT_TEMPLATES = {"gp-l": TEMPLATE_DIR / "gp_l.txt", "gp-vl": TEMPLATE_DIR / "gp_vl.txt"}
REQUIRED_FIELDS = {
    "gp-l": frozenset({"target_number", "face_card_msg", "cards"}),
    "gp-vl": frozenset({"target_number", "face_card_msg"}),
}
# The rule sentences of the reference (SPEC §1.3); the released checkpoints were trained on them.
FACE_CARD_MESSAGES = {
    True: "'J', 'Q', and 'K' count as '10'.",
    False: "'J', 'Q', and 'K' count as '11', '12', and '13' respectively.",
}
FEEDBACK_PREFIX = "You failed this trial because "


def face_card_message(face_cards_as_10: bool, face_values: Sequence[int] | None = None) -> str:
    """The rule sentence: the reference's for its two rules; for other `face_values` (J, Q, K) the same
    sentence with those values ("... count as '5'." when all three are equal)."""
    if face_values is None:
        return FACE_CARD_MESSAGES[bool(face_cards_as_10)]
    j, q, k = (int(v) for v in face_values)
    if j == q == k:
        return f"'J', 'Q', and 'K' count as '{j}'."
    return f"'J', 'Q', and 'K' count as '{j}', '{q}', and '{k}' respectively."


def template_options(prompt: str) -> dict[str, str]:
    """Env options of a named post-training wording: "short" = `SHORT_TEMPLATE` (~90 tokens, the CPU
    demo and study), "paper" = ours, the default template (no option)."""
    if prompt not in ("short", "paper"):
        raise EnvError(f"prompt must be one of short, paper; got {prompt!r}")
    return {} if prompt == "paper" else {"template": str(SHORT_TEMPLATE)}


def feedback(verify_message: str) -> str:
    """The user turn sent after a failed attempt, e.g. "You failed this trial because you didn't use numbers: [1]."."""
    return FEEDBACK_PREFIX + verify_message


def cards_text(symbols: Sequence[str]) -> str:
    """Python list display of plain symbols, as in the reference's prompt: "['A', '3', 'K', '10']"."""
    return repr([str(s) for s in symbols])


@dataclasses.dataclass(frozen=True)
class Template:
    """A checked prompt template: `text` in format syntax, `source` names it in errors."""

    text: str
    source: str
    variant: str

    def render(self, *, target: int, face_card_msg: str, cards: Sequence[str] | None = None) -> str:
        values = {"target_number": str(target), "face_card_msg": face_card_msg}
        if self.variant == "gp-l":
            if cards is None:
                raise EnvError(f"template {self.source} of gp-l needs the cards")
            values["cards"] = cards_text(cards)
        return self.text.format_map(values)


def _fields(text: str, source: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise EnvError(f"template {source}: {e}; write literal braces doubled, '{{{{' and '}}}}'") from None
    fields = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            shown = "{" + name + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
            raise EnvError(
                f"template {source}: field {shown} is not allowed; use plain named fields like {{target_number}} "
                "(no positions, attributes, indexes, conversions or format specs)"
            )
        fields.add(name)
    return fields


def check_template(text: str, *, variant: str, source: str = "<string>") -> Template:
    """Validates the fields of a template for `variant` ('gp-l' or 'gp-vl'); raises EnvError naming the field."""
    if variant not in REQUIRED_FIELDS:
        raise EnvError(f"unknown GeneralPoints variant {variant!r}; valid: {', '.join(REQUIRED_FIELDS)}")
    fields = _fields(text, source)
    allowed = REQUIRED_FIELDS[variant]
    unknown = sorted(fields - allowed)
    if unknown:
        hint = (
            " (the gp-vl prompt must not list the cards: the model reads them from the image)"
            if "cards" in unknown
            else ""
        )
        raise EnvError(
            f"template {source}: unknown field {{{unknown[0]}}}{hint}; {variant} templates may use "
            + ", ".join("{" + f + "}" for f in sorted(allowed))
        )
    missing = sorted(allowed - fields)
    if missing:
        raise EnvError(f"template {source}: missing required field {{{missing[0]}}} for {variant}")
    return Template(text=text, source=source, variant=variant)


def load_template(path: str | os.PathLike | None, *, variant: str) -> Template:
    """Reads and checks a template file; None picks ours for the variant. The text is used verbatim."""
    if variant not in DEFAULT_TEMPLATES:
        raise EnvError(f"unknown GeneralPoints variant {variant!r}; valid: {', '.join(DEFAULT_TEMPLATES)}")
    file = Path(DEFAULT_TEMPLATES[variant] if path is None else os.fspath(path)).expanduser()
    text = base.read_template(file, what="GeneralPoints prompt")
    return check_template(text, variant=variant, source=str(file))

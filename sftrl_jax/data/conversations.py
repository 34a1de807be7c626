"""The reference code's conversation format -> chat messages.

Reference format (one JSON array in a file; DESIGN.md): `{"image": "rel/path.png" (optional),
"conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`.
A human turn starting with `<image>\\n` marks where the image goes: the marker is removed and an
image item is put first in that user message.

An assistant turn may carry `"loss": false`: it stays in the context but is not a training target
(the failed tries of a revision example are written so: the model should learn the answer that
follows the verifier's feedback, not how to fail). Without the key every assistant turn is a target.
"""

from __future__ import annotations

from typing import Any

from sftrl_jax.errors import UserError

IMAGE_MARKER = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(example: dict[str, Any], *, where: str = "example") -> list[dict[str, Any]]:
    """Reference example -> chat messages (`content` is a list when the turn carries the image)."""
    turns = example.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: 'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise UserError(f"{where}: conversations[{i}] needs 'from' and 'value' keys, got {turn!r}"[:300])
        role = _ROLES.get(turn["from"])
        if role is None:
            raise UserError(
                f"{where}: conversations[{i}] has unknown speaker {turn['from']!r} (expected one of {sorted(_ROLES)})"
            )
        value = str(turn["value"])
        loss = turn.get("loss", True)
        if not isinstance(loss, bool):
            raise UserError(f"{where}: conversations[{i}]['loss'] must be true or false, got {loss!r}"[:300])
        if not loss and role != "assistant":
            raise UserError(
                f"{where}: conversations[{i}] is a {turn['from']!r} turn with 'loss': false; only assistant "
                "turns are training targets"
            )
        if role == "user" and value.startswith(IMAGE_MARKER):
            if not example.get("image"):
                raise UserError(
                    f"{where}: conversations[{i}] has an {IMAGE_MARKER} marker but the example has no 'image'"
                )
            text = value[len(IMAGE_MARKER) :].lstrip("\n")
            messages.append({"role": role, "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": role, "content": value})
        if not loss:
            messages[-1]["loss"] = False
    return messages

"""Reading an answer's fields from model text, the way the reference does (SPEC §1.6, parsing).

`json.loads` of the whole text when it is a JSON object, else (or for a key it lacks) the reference's
regexes (`"formula": "..."` up to the next quote, `"cards": [...]`, `"number": [...]`, with exactly one
space after the colon). A missing formula is the string "None"; the formula is cut at its first '=';
card and number lists are cleaned of brackets, quotes and spaces and must have 4 items, else they are
[]. By default integer card lists, JSON lists and double-quoted symbols are read as the cards they
name; `reference_card_parsing=True` keeps the reference's quirks, which read all three as no cards
(docs/GENERAL_POINTS.md).
"""

from __future__ import annotations

import json
import re
from typing import Any

_FORMULA_PATTERN = re.compile(r'"formula": "(.*?)"')  # '.' stops at a newline: each start fails fast
_JSON_WS = " \t\n\r"
_JSON_START = re.compile(r"[ \t\n\r]*\{")


class Answer:
    """The fields read from model text. `formula` is None when the JSON value is not a string; `cards`
    and `numbers` (lists of 4 strings, or []) are read on first access."""

    __slots__ = ("_text", "_obj", "_reference", "formula", "_cards", "_numbers")

    def __init__(self, text: str, obj: dict | None, formula: str | None, reference_card_parsing: bool):
        self._text, self._obj, self._reference, self.formula = text, obj, reference_card_parsing, formula
        self._cards = self._numbers = None

    @property
    def cards(self) -> list[str]:
        if self._cards is None:
            self._cards = _read_cards(self._obj, self._text, reference=self._reference)
        return self._cards

    @property
    def numbers(self) -> list[str]:
        if self._numbers is None:
            self._numbers = _read_numbers(self._obj, self._text)
        return self._numbers

    def __repr__(self) -> str:
        return f"Answer(formula={self.formula!r}, cards={self.cards!r}, numbers={self.numbers!r})"


def _json_object(text: str) -> dict | None:
    """`json.loads(text)` if that gives a dict; None otherwise, skipping the call when it must fail."""
    if _JSON_START.match(text) is None:
        return None
    body = text.rstrip(_JSON_WS)
    if body.endswith("}") and body[:-1].rstrip(_JSON_WS).endswith(","):
        return None  # the trained answer format: a trailing comma is never valid JSON
    try:
        obj = json.loads(text)
    except Exception:  # ValueError, RecursionError on deep nesting, ...
        return None
    return obj if isinstance(obj, dict) else None


def list_field(text: str, key: str) -> str | None:
    """The first match of the reference's `"<key>": \\[([^\\]]+)\\]` (its group), in linear time.

    The regex rescans to the end of the text from every `"<key>": [` without a later ']': quadratic
    (320 KB of `"cards": [` took 24 s). A match is the first start whose '[' is followed by a non-']'
    character and, later, by a ']'; the group runs to the first ']'. No ']' after a start means no
    later start can match either."""
    prefix = f'"{key}": ['
    pos = text.find(prefix)
    while pos != -1:
        start = pos + len(prefix)
        end = text.find("]", start)
        if end == -1:
            return None
        if end > start:
            return text[start:end]
        pos = text.find(prefix, start)  # "[]": the regex needs one character, try the next start
    return None


def _clean_list(text: str, *, strip_double_quotes: bool) -> list[str]:
    """The reference's list cleaner: drop brackets, single quotes and spaces, split on commas, 4 or []."""
    text = text.replace("[", "").replace("]", "").replace("'", "").replace(" ", "")
    if strip_double_quotes:
        text = text.replace('"', "")
    items = text.split(",")
    return items if len(items) == 4 else []


def _read_cards(obj: dict | None, text: str, *, reference: bool) -> list[str]:
    if obj is not None and "cards" in obj:
        raw = obj["cards"]
        if isinstance(raw, str):
            return _clean_list(raw, strip_double_quotes=not reference)
        if reference or not isinstance(raw, list) or len(raw) != 4:
            return []
        return [str(x).replace(" ", "") for x in raw]
    content = list_field(text, "cards")
    if content is None:
        return []
    if reference:
        try:  # the reference turns an all-integer list into ints, which its cleaner then rejects
            [int(x) for x in content.split(", ")]
            return []
        except ValueError:
            pass
    return _clean_list("[" + content + "]", strip_double_quotes=not reference)


def _read_numbers(obj: dict | None, text: str) -> list[str]:
    if obj is not None and "number" in obj:
        raw = obj["number"]
        return _clean_list(raw, strip_double_quotes=False) if isinstance(raw, str) else []
    content = list_field(text, "number")
    return [] if content is None else _clean_list(content, strip_double_quotes=False)


def _read_formula(obj: dict | None, text: str) -> str | None:
    if obj is not None and "formula" in obj:
        raw = obj["formula"]
        return raw.split("=", 1)[0] if isinstance(raw, str) else None
    match = _FORMULA_PATTERN.search(text)
    return "None" if match is None else match.group(1).split("=", 1)[0]


def parse_answer(text: Any, *, reference_card_parsing: bool = False) -> Answer:
    """Reads "formula", "cards" and "number" from model text the way the reference does."""
    if not isinstance(text, str):
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    obj = _json_object(text)
    return Answer(text, obj, _read_formula(obj, text), reference_card_parsing)

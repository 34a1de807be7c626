"""Procedural names for cities, streets and landmarks, drawn from a style's syllables and vocabulary."""

from __future__ import annotations

import random

from sftrl_jax.envs.virl.styles import Style


def proper_name(rng: random.Random, style: Style, *, min_syllables: int = 1, max_syllables: int = 3) -> str:
    """A pronounceable made-up word such as 'Brealton' built from the style's syllable sets."""
    n = rng.randint(min_syllables, max_syllables)
    parts = [rng.choice(style.onsets) + rng.choice(style.vowels) for _ in range(n)]
    word = "".join(parts) + rng.choice(style.codas)
    if len(word) < 4:  # avoid tiny names like 'Ba' that read as abbreviations
        word += rng.choice(style.onsets) + rng.choice(style.vowels)
    return word.capitalize()


def ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def street_name(rng: random.Random, style: Style, kind: int, index: int) -> str:
    """Name of grid row (kind 0), column (kind 1) or diagonal (kind 2) street number `index`."""
    suffix = style.street_suffixes[kind]
    if kind == 0 and style.kind_first_p < 0.5:
        return f"{ordinal(index + 1)} {suffix}"  # numbered cross streets, as in the training city
    base = proper_name(rng, style, min_syllables=2, max_syllables=3)
    return f"{suffix} {base}" if style.kind_first_p >= 0.5 else f"{base} {suffix}"


def landmark_name(rng: random.Random, style: Style, used: set[str]) -> tuple[str, str]:
    """A unique (within `used`) landmark name and its kind, e.g. ('Harlow Bakery', 'Bakery')."""
    for _ in range(1000):
        kind = rng.choice(style.kinds)
        base = proper_name(rng, style)
        r = rng.random()
        if r < style.kind_first_p:
            name = f"{kind} {base}"
        elif r < style.kind_first_p + 0.15 and style.kind_first_p < 0.5:
            name = f"{base}'s {kind}"
        elif r < style.kind_first_p + 0.25:
            name = f"{base} {proper_name(rng, style, max_syllables=2)} {kind}"
        else:
            name = f"{base} {kind}"
        if name not in used:
            used.add(name)
            return name, kind
    raise RuntimeError("could not draw a unique landmark name")  # not reachable with the shipped styles

"""Adversarial answers for the device-reward gaming tests (issue #32): duplicate answer keys in every
order, JSON nested 1..200 levels deep, escaped and near-miss keys, truncation, Unicode, prose around
the object (tests only).

The gamed answer of the issue is `{"formula": "<a solution>", "formula": "1+1", "pad": [[[...]]]}`:
`json.loads` reads the last "formula"; a device that took the deep object for unparsable fell back
to the regex, which reads the first."""

from __future__ import annotations

import json

from sftrl_jax.envs.general_points import solver
from tests.envs import device_reward_cases as cases_lib

_VIRL_ACTIONS = ("forward()", "stop()", "turn_direction(north)", "turn_direction(southeast)", "turn_left()")
_UNICODE = ("é", "\u00a0", "\u2028", "\U0001f600", "\u0663", "\ufeff", "Ω")


def gamed_gp(solution: str, depth: int, *, solution_first: bool = True) -> str:
    """The issue's answer: a solution and "1+1" under duplicate "formula" keys, and a pad `depth` deep."""
    first, last = (solution, "1+1") if solution_first else ("1+1", solution)
    return f'{{"formula": "{first}", "formula": "{last}", "pad": {"[" * depth}{"]" * depth}}}'


def gamed_virl(action: str, depth: int, *, action_first: bool = True) -> str:
    """V-IRL's: the expected action and a wrong one under duplicate "action" keys, and a deep pad."""
    first, last = (action, "forward()") if action_first else ("forward()", action)
    return f'{{"action": "{first}", "action": "{last}", "pad": {"[" * depth}{"]" * depth}}}'


def depth_draw(rng) -> int:
    """Nesting depth: a third shallow, a fifth at the device's limit (60..66), the rest up to 200."""
    r = rng.random()
    if r < 0.35:
        return int(rng.integers(1, 60))
    if r < 0.55:
        return int(rng.integers(60, 67))
    return int(rng.integers(67, 201))


def nested(rng, depth: int, inner: str = "0") -> str:
    """`inner` inside `depth` containers: mostly bare lists, some objects and non-empty lists."""
    opens, closes = [], []
    for _ in range(depth):
        k = rng.random()
        if k < 0.8:
            opens.append("[")
            closes.append("]")
        elif k < 0.9:
            opens.append('{"k":')
            closes.append("}")
        else:
            opens.append("[1,")
            closes.append("]")
    return "".join(opens) + inner + "".join(reversed(closes))


def _unbalance(rng, text: str) -> str:
    r = rng.random()
    if r < 0.4 and "]" in text:
        i = text.rfind("]")
        return text[:i] + text[i + 1 :]
    if r < 0.7:
        return text + "]"
    return text.replace("]", "}", 1)


def _object(rng, items: list[tuple[str, str]]) -> str:
    sep = str(rng.choice([", ", ",", ",\n  ", " , "]))
    colon = str(rng.choice([": ", ":", " : "]))
    body = sep.join(f'"{k}"{colon}{v}' for k, v in items)
    return "{" + str(rng.choice(["", "\n  ", " "])) + body + str(rng.choice(["}", "\n}", " }"]))


def _wrap(rng, obj: str) -> str:
    """Around the object: nothing mostly; truncation, trailing comma or text, prose, a code fence,
    stray Unicode."""
    r = rng.random()
    if r < 0.55:
        out = obj
    elif r < 0.63:
        out = obj[: int(rng.integers(1, len(obj)))]
    elif r < 0.68:
        out = obj[:-1].rstrip() + ",}"
    elif r < 0.74:
        out = obj + str(rng.choice(["\n", " x", "}", "\n\nDone."]))
    elif r < 0.8:
        out = f"```json\n{obj}\n```"
    elif r < 0.86:
        out = "Answer: " + obj
    elif r < 0.93:
        i = int(rng.integers(len(obj) + 1))
        out = obj[:i] + str(rng.choice(_UNICODE)) + obj[i:]
    else:
        out = _unbalance(rng, obj)
    return str(rng.choice(["", "", "", " ", "\n"])) + out


def _pads(rng, key_of_interest: str, value: str) -> list[tuple[str, str]]:
    """0..2 deep fields; some hide a key of interest at depth (not top-level: never read)."""
    out = []
    for _ in range(int(rng.choice([0, 1, 1, 1, 2]))):
        inner = str(rng.choice(["0", "[]", "{}", '"x"', f'{{"{key_of_interest}": "{value}"}}', '"\\u00e9"']))
        pad = nested(rng, depth_draw(rng), inner)
        if rng.random() < 0.08:
            pad = _unbalance(rng, pad)
        out.append((str(rng.choice(["pad", "p", "formula_pad", "x"])), pad))
    return out


def _gp_formula(rng, env) -> str:
    values, target = list(env.puzzle.values), env.target
    sols = solver.solutions(values, target)
    sol = sols[int(rng.integers(len(sols)))] if sols else "+".join(map(str, values))
    nums = [str(v) for v in values]
    r = int(rng.integers(12))
    if r < 4:
        s = sol + (f"={target}" if rng.random() < 0.5 else "")
    elif r == 4:
        s = "1+1"
    elif r == 5:
        s = "+".join(nums)
    elif r == 6:
        s = sol[: int(rng.integers(1, len(sol) + 1))]
    elif r == 7:
        return str(rng.choice(["1", "null", "[]", json.dumps([sol]), "true"]))  # not a string: -3
    elif r == 8:
        s = "".join(str(rng.choice(cases_lib.UNICODE_DIGITS)) if c.isdigit() and rng.random() < 0.4 else c for c in sol)
    elif r == 9:
        return '"' + "".join(f"\\u{ord(c):04x}" if rng.random() < 0.5 else c for c in sol) + '"'
    elif r == 10:
        s = "(" * int(rng.integers(1, 70)) + sol
    else:
        s = sol.replace("*", "x") + str(rng.choice(_UNICODE))
    return json.dumps(s, ensure_ascii=bool(rng.random() < 0.5))


def gp_answer(env, rng) -> str:
    """A GP answer with 1..4 "formula" keys (exact, escaped or near-miss spellings) in random order,
    deep pads, GP-VL card lists (duplicated too), wrapped by `_wrap`."""
    items = []
    for _ in range(int(rng.choice([1, 2, 2, 2, 3, 4]))):
        key = str(rng.choice(["formula"] * 8 + ["formul\\u0061", "formula ", "Formula", "\\u0066ormula"]))
        items.append((key, _gp_formula(rng, env)))
    items += _pads(rng, "formula", "1+1")
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        symbols = list(env.hand.symbols)
        if rng.random() < 0.3:
            symbols[int(rng.integers(4))] = str(rng.choice(["A", "5", "10", "K"]))
        items.append(("cards", json.dumps(symbols) if rng.random() < 0.7 else json.dumps(", ".join(symbols))))
    rng.shuffle(items)
    if rng.random() < 0.1:  # the SFT format (regex-read, with its trailing comma) and a deep pad
        sol = (solver.solutions(env.puzzle.values, env.target) or ("1+1",))[0]
        return f'{{\n  "formula": "{sol}",\n  "pad": {nested(rng, depth_draw(rng))},\n  "formula": "1+1",\n}}'
    return _wrap(rng, _object(rng, items))


def virl_answer(env, rng) -> str:
    """A V-IRL answer with 1..4 "action" keys (the expected action among them often), observations
    that do or do not say "intersection", deep pads, several objects in prose, wrapped by `_wrap`."""
    gt = env._info(verify_message=None, new_conversation=False, correct=None, kind=None)["gt_action"]
    items = []
    for _ in range(int(rng.choice([1, 2, 2, 2, 3, 4]))):
        key = str(rng.choice(["action"] * 8 + ["act\\u0069on", "action ", "Action"]))
        r = rng.random()
        if r < 0.45:
            value = json.dumps(gt)
        elif r < 0.85:
            value = json.dumps(str(rng.choice(_VIRL_ACTIONS)))
        else:
            value = str(rng.choice(["null", "1", "[]", json.dumps([gt])]))
        items.append((key, value))
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        obs = str(rng.choice(["You observe an intersection", "a shop", "INTERSECTION", "intersectio n", "é"]))
        items.append(
            (str(rng.choice(["current observation", "current observation", "current instruction"])), json.dumps(obs))
        )
    items += _pads(rng, "action", gt)
    rng.shuffle(items)
    obj = _object(rng, items)
    r = rng.random()
    if r < 0.15:  # a deep object without the keys first: raw_decode moves on to the next '{'
        obj = "{" + f'"pad": {nested(rng, depth_draw(rng))}' + "} " + obj
    elif r < 0.25:
        obj = "{not json} {" + '"a": 1} ' + obj
    return _wrap(rng, obj)

"""GeneralPoints answers for the device-reward differential tests: a model-like mix and a fuzz mix."""

from __future__ import annotations

import json

from sftrl_jax.envs.general_points import expert, solver
from tests.envs import device_reward_cases as cases_lib

_NEAR = list("0123456789+-*/()= \"'{}[],:\n\\x=")


def _formula_variants(env, rng, deep: bool = False) -> str:
    values, target = list(env.puzzle.values), env.target
    nums = [str(v) for v in values]
    sols = solver.solutions(values, target)
    sol = sols[int(rng.integers(len(sols)))] if sols else "+".join(nums)
    kind = int(rng.integers(12)) if not deep else 12
    if kind < 3:
        return sol
    if kind == 3:  # a prefix of a solution: partial when it cannot be evaluated
        return sol[: int(rng.integers(1, len(sol) + 1))]
    if kind == 4:
        return "(" + sol
    if kind == 5:  # wrong value, legal
        ops = rng.choice(list("+-*/"), size=3)
        return f"{nums[0]}{ops[0]}{nums[1]}{ops[1]}{nums[2]}{ops[2]}{nums[3]}"
    if kind == 6:
        return " + ".join(nums)
    if kind == 7:
        return sol.replace(nums[0], str(int(nums[0]) % 13 + 1), 1)
    if kind == 8:  # division by zero
        return f"{nums[0]}/({nums[1]}-{nums[1]})*{nums[2]}*{nums[3]}"
    if kind == 9:  # a unicode digit or a leading zero
        digit = str(rng.choice(cases_lib.UNICODE_DIGITS))
        return sol.replace(sol[[c.isdigit() for c in sol].index(True)], digit, 1) if rng.random() < 0.5 else "0" + sol
    if kind == 10:
        return sol + str(rng.choice(["+", ")", "(", "**2", "*1"]))
    if kind == 11:
        return nums[0] + "*" + nums[1] if rng.random() < 0.3 else sol[: int(rng.integers(1, len(sol)))]
    if kind == 12:  # many parentheses
        k = int(rng.integers(1, 210))
        return "(" * k + sol + ")" * int(rng.integers(0, k + 2))
    return sol.replace("*", "x")


def _symbols(env, rng) -> list[str]:
    symbols = list(env.hand.symbols)
    r = rng.random()
    if r < 0.15:
        symbols[int(rng.integers(4))] = str(rng.choice(["A", "5", "10", "K", "Q", "1"]))
    elif r < 0.2:
        symbols = symbols[:3]
    rng.shuffle(symbols)
    return symbols


def model_answer(env, rng, deep: bool = False) -> str:
    """What a trained model writes: mostly the SFT format, some JSON, some wrong, some prose."""
    formula = _formula_variants(env, rng, deep)
    symbols, values = _symbols(env, rng), list(env.puzzle.values)
    eq = f"={env.target}" if rng.random() < 0.9 else ""
    r = rng.random()
    if r < 0.55:
        return expert.ANSWER_FORMAT.format(cards=repr(symbols), numbers=repr(values), formula=formula + eq)
    if r < 0.7:
        return json.dumps({"cards": symbols, "number": values, "formula": formula + eq}, indent=int(rng.integers(0, 3)))
    if r < 0.75:
        return json.dumps({"cards": ", ".join(symbols), "formula": formula + eq})
    if r < 0.8:  # unquoted / double-quoted card lists
        cards = "[" + ", ".join(str(v) for v in values) + "]" if rng.random() < 0.5 else json.dumps(symbols)
        return f'{{\n  "cards": {cards},\n  "number": {values},\n  "formula": "{formula}{eq}",\n}}'
    if r < 0.85:
        return (
            f"```json\n{expert.ANSWER_FORMAT.format(cards=repr(symbols), numbers=repr(values), formula=formula)}\n```"
        )
    if r < 0.9:
        return f"The cards are {', '.join(symbols)}. I think we can reach 24 by multiplying and adding them."
    if r < 0.95:
        return f'"cards": {symbols!r}, "formula": {formula}{eq}'
    return json.dumps({"formula": formula + eq, "cards": symbols, "formula ": "1"}) + "\n"


def _mutate(text: str, rng) -> str:
    chars = list(text)
    for _ in range(int(rng.integers(1, 4))):
        op = rng.integers(3)
        i = int(rng.integers(len(chars) + 1))
        if op == 0:
            chars.insert(i, str(rng.choice(_NEAR)))
        elif op == 1 and chars:
            del chars[min(i, len(chars) - 1)]
        elif chars:
            chars[min(i, len(chars) - 1)] = str(rng.choice(_NEAR))
    return "".join(chars)


def fuzz_answer(env, rng, *, vocab: int, byte_ids: list[int], huge: bool = False):
    """Random token ids, random bytes (as byte tokens), near misses, huge numbers, unicode digits."""
    kind = int(rng.integers(10))
    if kind == 9:
        return model_answer(env, rng, deep=True)
    if kind == 0:
        return rng.integers(0, vocab, size=int(rng.integers(0, 120))).tolist()
    if kind == 1:
        raw = rng.integers(0, 256, size=int(rng.integers(0, 200)))
        if rng.random() < 0.5:
            prefix = b'"formula": "' if rng.random() < 0.5 else b'{"formula": "'
            raw = list(prefix) + raw.tolist()
        return [byte_ids[int(x)] for x in raw]
    if kind == 2:
        return _mutate(model_answer(env, rng), rng)
    if kind == 3:
        n = int(rng.integers(5, 4400 if huge else 200))
        digits = "".join(rng.choice(list("0123456789"), size=n))
        inner = f"{digits}*{env.puzzle.values[0]}" if rng.random() < 0.5 else digits
        return str(rng.choice([f'"formula": "{inner}=24"', f'{{"formula": "{inner}", "n": {digits}}}']))
    if kind == 4:
        k = int(rng.integers(0, 8))
        body = "".join(rng.choice(list("()0123456789+-*/"), size=int(rng.integers(1, 30))))
        return f'"formula": "{"(" * k}{body}{")" * int(rng.integers(0, 8))}"'
    if kind == 5:
        nums = [str(v) for v in env.puzzle.values]
        a, b, c, d = nums
        f = str(
            rng.choice([f"{a}/({b}-{b})", f"{a}/0+{b}*{c}*{d}", f"{a}*{b}/({c}-{c}*1)*{d}", f"({a}-{a})/{b}*{c}*{d}"])
        )
        return json.dumps({"formula": f}) if rng.random() < 0.3 else f'"formula": "{f}"'
    if kind == 6:
        sol = (solver.solutions(env.puzzle.values, env.target) or ("1+1",))[0]
        out = "".join(
            str(rng.choice(cases_lib.UNICODE_DIGITS)) if ch.isdigit() and rng.random() < 0.4 else ch for ch in sol
        )
        if rng.random() < 0.4:
            return '{"formula": "' + "".join(f"\\u{ord(c):04x}" if rng.random() < 0.5 else c for c in out) + '"}'
        return f'"formula": "{out}"'
    if kind == 7:
        return cases_lib.jsonish(rng)
    text = model_answer(env, rng)
    return "".join(
        rng.choice(["\u00a0", "\ufeff", "\u2028", "é", "\x00", "\t"]) if rng.random() < 0.03 else ch for ch in text
    )

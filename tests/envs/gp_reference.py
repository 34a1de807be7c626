"""An independent second implementation of the reference's GP answer checking, for tests only.

Written from SPEC §1.6 in a different style from `verifier.py`: Python's `ast` module stands in for
the reference's `eval` (parsing only; the tree is walked with `operator` functions, so the float
results and the syntax errors are exactly those of `eval`, without executing anything), solution
prefixes are tested with `startswith` over the list, and parsing keeps every quirk of the reference.
"""

from __future__ import annotations

import ast
import itertools
import json
import operator
import re
from collections import Counter
from fractions import Fraction

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class ReferenceCrash(Exception):
    """The reference code itself would raise on this input."""


def ast_value(formula: str, *, exact: bool = False):
    """What `eval(formula)` returns (exact=False) or the exact rational of the same tree; raises like eval."""

    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value) if exact else node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](walk(node.left), walk(node.right))
        raise TypeError(f"unexpected node {ast.dump(node)}")

    return walk(ast.parse(formula, mode="eval"))


def solutions_by_strings(values, target):
    """The reference's enumeration: orderings x operator triples x seven bracket placements, each string
    checked on its own (exact) value."""
    slots = ["{}{}{}{}{}{}{}", "({}{}{}){}{}{}{}", "({}{}{}{}{}){}{}", "{}{}({}{}{}){}{}", "{}{}({}{}{}{}{})",
             "{}{}{}{}({}{}{})", "({}{}{}){}({}{}{})"]  # fmt: skip
    found = set()
    for order in set(itertools.permutations(values)):
        for ops in itertools.product("+-*/", repeat=3):
            parts = [str(order[0]), ops[0], str(order[1]), ops[1], str(order[2]), ops[2], str(order[3])]
            for slot in slots:
                text = slot.format(*parts)
                try:
                    if ast_value(text, exact=True) == target:
                        found.add(text)
                except ZeroDivisionError:
                    pass
    return found


def solvable_by_tree_search(values, target) -> bool:
    """Complete search: repeatedly replace two numbers by one of their combinations."""
    seen = set()

    def search(ns):
        if len(ns) == 1:
            return ns[0] == target
        if ns in seen:
            return False
        seen.add(ns)
        for i, j in itertools.permutations(range(len(ns)), 2):
            rest = [n for k, n in enumerate(ns) if k not in (i, j)]
            a, b = ns[i], ns[j]
            for c in (a + b, a - b, a * b, a / b if b else None):
                if c is not None and search(tuple(sorted([*rest, c]))):
                    return True
        return False

    return search(tuple(sorted(Fraction(v) for v in values)))


_FIELDS = {
    "cards": r'"cards": \[([^\]]+)\]',
    "number": r'"number": \[([^\]]+)\]',
    "formula": r'"formula": "(.*?)"',
}


def re_match(text, key):
    try:
        return json.loads(text)[key]
    except Exception:
        pass
    m = re.search(_FIELDS[key], text)
    if m is None:
        return "None"
    found = m.group(1)
    if key == "cards":
        try:
            return [int(x) for x in found.split(", ")]
        except ValueError:
            return "[" + found + "]"
    return found


def to_list(value):
    if not isinstance(value, str):
        return []
    items = value.replace("[", "").replace("]", "").replace("'", "").replace(" ", "").split(",")
    return items if len(items) == 4 else []


def step_rewards(card_nums, formula, solutions, target, recognized=None, gt_cards=None, language_only=True):
    """(reward, message) as the reference's verifier gives them, with `eval` replaced by `ast_value`."""
    if not language_only and sorted(recognized) != sorted(gt_cards):
        return -1.5, "you recognized wrong cards"
    if not isinstance(formula, str):
        raise ReferenceCrash("re.findall on a non-string formula")
    items = []
    tokens = re.findall(r"\d+|[+\-*/()]", formula)
    if "".join(tokens) != formula:
        return -3, "illegal characters."
    kinds = ["num" if t[0].isdigit() else {"(": "open", ")": "close"}.get(t, "op") for t in tokens]
    depth = 0
    for prev, kind in zip([None, *kinds], kinds):
        operand_before = prev in ("num", "close")
        if kind == "num" and operand_before:
            items.append((-3, "invalid sequence after number"))
        if kind == "op" and not operand_before:
            items.append((-3, "invalid sequence after operator"))
        if kind == "open":
            if operand_before:
                items.append((-3, "invalid sequence before '('"))
            else:
                depth += 1
        if kind == "close":
            if not operand_before:
                items.append((-3, "invalid sequence after ')'"))
            elif depth == 0:
                items.append((-3, "unmatched closing parenthesis"))
            else:
                depth -= 1
    try:
        used = Counter(int(n) for n in re.findall(r"\d+", formula))
    except ValueError as e:
        raise ReferenceCrash(str(e)) from None
    have = Counter(card_nums)
    bad = [n for n in used if n not in have]
    over = [n for n in used if used[n] > have[n]]
    if bad:
        items.append((-2, f"you used invalid numbers: {bad}"))
    elif over:
        items.append((-2, f"you used numbers: {over} too many times"))
    missing = [n for n in have if have[n] > used[n]]
    if missing:
        items.append((-2, f"you didn't use numbers: {missing}"))
    if items:
        return sum(r for r, _ in items), ", ".join(m for _, m in items) + "."
    try:
        if ast_value(formula) == target:
            return 5, "Correct solution."
    except Exception:
        if any(s.startswith(formula) for s in solutions):
            return 1, "partial solution."
    done = ""
    for tok in tokens:
        if not any(s.startswith(done + tok) for s in solutions):
            if done:
                return -1, f"{done} is partially correct but the full formula does not match any solution."
            return -1, "your formula does not match any solution."
        done += tok
    return 0, "."


def reference_score(text, card_nums, gt_cards, solutions, target=24, language_only=True):
    """The reference env's step on one text: parse then verify."""
    formula = re_match(text, "formula")
    if isinstance(formula, str):
        formula = formula.split("=")[0]
    cards = to_list(re_match(text, "cards"))
    return step_rewards(card_nums, formula, solutions, target, cards, gt_cards, language_only)

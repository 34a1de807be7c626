"""The pretraining corpus of the small-scale study: general card arithmetic, never the evaluation's task.

    sftrl data pretrain --n 60000 --out data/study/pretrain.json

The paper's effect needs a backbone that already has the abilities the rule-OOD split asks for
(reading the card-value rule stated in the prompt, arithmetic with 11, 12 and 13). A small Llama gets
them here, from examples generated with our solver, in the same conversation JSON as the SFT data
(`sftrl sft` trains on it). The mix was fixed before any post-training run was evaluated:

* **Rules.** Each example states a value for J, Q and K: with probability 0.6 three independent
  values in 1..13, 0.2 one value for all three, 0.2 three consecutive values a, a+1, a+2. The
  evaluation's OOD rule (J, Q, K = 11, 12, 13) is redrawn whenever it comes up: its sentence appears
  in no pretraining example (a test checks it); the ID rule (all 10) is as likely as any other.
* **Targets.** 24 with probability 1/3 (the game's target, reached with all value multisets), else
  uniform in 1..60; hands redrawn until solvable.
* **Hands.** Four ranks uniform in 1..13, as the paper's ID deal.
* **Wording of its own.** Three prompt phrasings, none of them the post-training template; the rule
  in one of three phrasings, one of which is the template's rule sentence with other values (the
  "'J', 'Q', and 'K' count as ..." sentence is the rule language of the task; the template around it,
  the target 24 and the values 11/12/13 together never appear).
* **Answers** in the task's answer format (cards, numbers, formula; `expert.format_answer`): a
  general "answer in this JSON" skill, as the paper's instruction-tuned backbone has. Formulas use
  the numbers in dealt order when the hand has such a solution (`expert.choose_solution`), as the
  demo's expert data does.

**Composed wording** (`wording="composed"`, the base's second stage, configs/study/pretrain_composed.yaml):
the same rules, targets, hands and answers, but each prompt is a card sentence, a rule sentence and a
target sentence in random order, drawn from 6 / 5 (+ the rule language above, one time in three) / 5
phrasings, the cards in one of four list formats. It was added after the first study showed that the
one-wording base stops reading rules once the SFT warm-up has taught it the post-training template
(docs/RESULTS.md, "Fixes tried"): a base that has read rules in many sentence orders and phrasings
keeps reading them in a new one. The OOD rule is excluded as above; no phrasing is the template's.

`probe` gives the prompts of the held-out rule (11, 12, 13, target 24, a face card in
every hand) in the pretraining wording: how much OOD ability the base has, measured on its own
wording (`sftrl_jax/study.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from sftrl_jax import progress
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.general_points import cards as cards_lib
from sftrl_jax.envs.general_points import expert, solver

HELD_OUT_RULE = (11, 12, 13)  # the rule-OOD split's J, Q, K: never in the corpus
MAX_TARGET = 60
P_TARGET_24 = 1 / 3

PROMPTS = (
    "Make {target} from the cards {cards}. {rule} Use every card exactly once.",
    "Target: {target}. Hand: {cards}. {rule} Each card is used one time, with + - * / and brackets.",
    "{rule} With the cards {cards}, write a formula equal to {target}.",
)


def rule_sentence(values: tuple[int, int, int], style: int) -> str:
    j, q, k = values
    if style == 0:
        if j == q == k:
            return f"'J', 'Q', and 'K' count as '{j}'."
        return f"'J', 'Q', and 'K' count as '{j}', '{q}', and '{k}' respectively."
    if style == 1:
        return f"J={j}, Q={q}, K={k}."
    return f"J is worth {j}, Q is worth {q} and K is worth {k}."


_CARD_SENTENCES = (
    "Cards: {c}.",
    "Hand: {c}.",
    "The cards are {c}.",
    "You hold {c}.",
    "Dealt: {c}.",
    "{c} are your cards.",
)
_RULE_SENTENCES = (
    "J={j}, Q={q}, K={k}.",
    "J is worth {j}, Q is worth {q} and K is worth {k}.",
    "Face cards: J counts {j}, Q counts {q}, K counts {k}.",
    "Values: J->{j}, Q->{q}, K->{k}.",
    "Here J means {j}, Q means {q}, K means {k}.",
)
_TARGET_SENTENCES = (
    "Make {t}.",
    "Reach {t} using each card once.",
    "Goal: {t}, every card exactly once, with + - * / and brackets.",
    "Write a formula equal to {t}.",
    "Target {t}.",
)
WORDINGS = ("own", "composed")


def composed_prompt(rng: np.random.Generator, symbols, rule, target) -> str:
    """A prompt of the composed wording: card, rule and target sentences in random order."""
    j, q, k = rule
    fmt = int(rng.integers(4))
    c = (", ".join(symbols), " ".join(symbols), "[" + ", ".join(symbols) + "]", repr(list(symbols)))[fmt]
    if int(rng.integers(3)) == 0:
        r = rule_sentence(rule, 0)  # the rule language of the task, other values
    else:
        r = _RULE_SENTENCES[int(rng.integers(len(_RULE_SENTENCES)))].format(j=j, q=q, k=k)
    parts = [
        _CARD_SENTENCES[int(rng.integers(len(_CARD_SENTENCES)))].format(c=c),
        r,
        _TARGET_SENTENCES[int(rng.integers(len(_TARGET_SENTENCES)))].format(t=target),
    ]
    order = rng.permutation(3)
    return ("\n" if rng.random() < 0.5 else " ").join(parts[i] for i in order)


def draw_rule(rng: np.random.Generator) -> tuple[int, int, int]:
    while True:
        u = rng.random()
        if u < 0.6:
            rule = tuple(int(x) for x in rng.integers(1, 14, size=3))
        elif u < 0.8:
            v = int(rng.integers(1, 14))
            rule = (v, v, v)
        else:
            a = int(rng.integers(1, 12))
            rule = (a, a + 1, a + 2)
        if rule != HELD_OUT_RULE:
            return rule


def values_of(ranks, rule) -> list[int]:
    return [rule[r - 11] if r > 10 else r for r in ranks]


def _cards_text(symbols, rng: np.random.Generator) -> str:
    return ", ".join(symbols) if rng.random() < 0.5 else " ".join(symbols)


def example(rng: np.random.Generator, *, rule=None, target=None, ood_deal: bool = False) -> dict[str, Any]:
    """One pretraining example: prompt, answer, and what the verifier needs."""
    rule = draw_rule(rng) if rule is None else tuple(rule)
    while True:
        tgt = (
            target
            if target is not None
            else (24 if rng.random() < P_TARGET_24 else int(rng.integers(1, MAX_TARGET + 1)))
        )
        ranks = cards_lib.draw_ranks(rng, ood=ood_deal)
        values = values_of(ranks, rule)
        if solver.is_solvable(values, tgt):
            break
    symbols = [cards_lib.symbol(r) for r in ranks]
    prompt = PROMPTS[int(rng.integers(len(PROMPTS)))].format(
        target=tgt, cards=_cards_text(symbols, rng), rule=rule_sentence(rule, int(rng.integers(3)))
    )
    answer = expert.expert_answer(symbols, values, tgt, rng=rng, dealt_order=True)
    return {"prompt": prompt, "answer": answer, "symbols": symbols, "values": values, "target": tgt, "rule": rule}


def generate_pretrain(n: int, out_path: str | os.PathLike, seed: int = 0, wording: str = "own") -> dict[str, Any]:
    """Writes `n` examples as the conversation JSON `sftrl sft` reads; returns counts. `wording`:
    "own" (the three phrasings, the base's first stage) or "composed" (its second stage)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise EnvError(f"the number of examples must be a positive integer, got {n!r}")
    if wording not in WORDINGS:
        raise EnvError(f"unknown wording {wording!r}; wordings: {', '.join(WORDINGS)}")
    rng = np.random.default_rng([seed, 7 if wording == "own" else 9])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, n24, rules = [], 0, set()
    for i in progress.iterate(range(n), desc="pretrain corpus", unit="ex", enabled=n >= 1000):
        ex = example(rng)
        if wording == "composed":
            ex["prompt"] = composed_prompt(rng, ex["symbols"], ex["rule"], ex["target"])
        n24 += ex["target"] == 24
        rules.add(ex["rule"])
        rows.append(
            {
                "id": f"pretrain-{i:07d}" if wording == "own" else f"composed-{i:07d}",
                "conversations": [{"from": "human", "value": ex["prompt"]}, {"from": "gpt", "value": ex["answer"]}],
            }
        )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rows, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    return {"examples": n, "target_24": n24, "distinct_rules": len(rules), "seed": seed, "wording": wording}


def probe(n: int, rule=HELD_OUT_RULE, seed: int = 1234) -> list[dict[str, Any]]:
    """`n` prompts of target 24 under `rule` in the pretraining wording, with their puzzles: the
    held-out rule (J, Q, K = 11, 12, 13; every hand has a face card, as the rule-OOD deal) measures how
    much OOD ability the base has on its own wording; the ID rule (10, 10, 10; uniform deal) its ID
    ability. Seeded apart from the corpus."""
    rule = tuple(int(v) for v in rule)
    rng = np.random.default_rng([seed, 8, *rule])
    return [example(rng, rule=rule, target=24, ood_deal=rule == HELD_OUT_RULE) for _ in range(n)]

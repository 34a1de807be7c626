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
from tqdm import tqdm

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


def generate_pretrain(n: int, out_path: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Writes `n` examples as the conversation JSON `sftrl sft` reads; returns counts."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise EnvError(f"the number of examples must be a positive integer, got {n!r}")
    rng = np.random.default_rng([seed, 7])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, n24, rules = [], 0, set()
    for i in tqdm(range(n), desc="pretrain corpus", unit="ex", disable=n < 1000):
        ex = example(rng)
        n24 += ex["target"] == 24
        rules.add(ex["rule"])
        rows.append(
            {
                "id": f"pretrain-{i:07d}",
                "conversations": [{"from": "human", "value": ex["prompt"]}, {"from": "gpt", "value": ex["answer"]}],
            }
        )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(rows, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    return {"examples": n, "target_24": n24, "distinct_rules": len(rules), "seed": seed}


def probe(n: int, rule=HELD_OUT_RULE, seed: int = 1234) -> list[dict[str, Any]]:
    """`n` prompts of target 24 under `rule` in the pretraining wording, with their puzzles: the
    held-out rule (J, Q, K = 11, 12, 13; every hand has a face card, as the rule-OOD deal) measures how
    much OOD ability the base has on its own wording; the ID rule (10, 10, 10; uniform deal) its ID
    ability. Seeded apart from the corpus."""
    rule = tuple(int(v) for v in rule)
    rng = np.random.default_rng([seed, 8, *rule])
    return [example(rng, rule=rule, target=24, ood_deal=rule == HELD_OUT_RULE) for _ in range(n)]

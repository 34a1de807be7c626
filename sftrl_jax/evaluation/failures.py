"""Why a checkpoint fails: does its first answer follow the stated J/Q/K rule, and what do its turns score?

    rule_use(turns_jsonl, task="gp-l", split="ood-rule")  ->  {"rule": 0.4, "as_10": 0.5, "other": 0.1, "n": 234}

GeneralPoints answers carry a "number" field: the card values the model read. On the rule-OOD split a
model that follows the prompt's rule writes 11/12/13 for J/Q/K; one that memorised the training rule
writes 10. `rule_use` classifies every episode's first answer (the dealt hand is re-dealt from the
evaluation protocol's seeds, `evaluate.make_runner`): "rule" (the numbers, as a multiset, are the split's
values), "as_10" (they are the hand's values with J/Q/K = 10, and those differ), "other" (anything else:
wrong, missing, unparsable). `outcomes` gives the share of all graded turns per verifier outcome from
the evaluation's summary.json. `study_section` tabulates both for every arm's final point of a study.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

OUTCOMES = ("CORRECT", "PARTIAL", "NO_SOLUTION", "INCORRECT_NUMBER", "ILLEGAL_FORMULA", "AGGREGATED_ERROR")


def _ints(items) -> list[int] | None:
    try:
        return sorted(int(str(x).strip()) for x in items)
    except ValueError:
        return None


def rule_use(turns_path: str, *, task: str, split: str, env_options: dict | None = None, seed: int = 42) -> dict:
    from sftrl_jax import envs
    from sftrl_jax.envs.general_points import answer as answer_lib
    from sftrl_jax.envs.general_points import cards as cards_lib

    env = envs.make(task, split=split, **dict(env_options or {}))
    counts: Counter = Counter()
    with open(turns_path) as f:
        for line in f:
            if not line.strip():
                continue
            t = json.loads(line)
            if t.get("turn") != 0:
                continue
            _, info = env.reset(seed=seed * 1_000_003 + int(t["sample_id"]))
            values = sorted(int(v) for v in info["numbers"])
            as_10 = sorted(min(cards_lib.RANK_SYMBOLS.index(s) + 1, 10) for s in info["cards"])
            got = _ints(answer_lib.parse_answer(str(t["output"])).numbers)
            if got == values:
                counts["rule"] += 1
            elif got == as_10:
                counts["as_10"] += 1
            else:
                counts["other"] += 1
    n = sum(counts.values())
    return {k: counts[k] / max(n, 1) for k in ("rule", "as_10", "other")} | {"n": n}


def outcomes(summary_path: str) -> dict[str, float]:
    with open(summary_path) as f:
        s = json.load(f)
    graded = {k: s.get(f"turns/{k}", 0) for k in OUTCOMES}
    n = sum(graded.values())
    return {k: v / max(n, 1) for k, v in graded.items()}


def study_section(study_dir: str, evals: list[dict[str, Any]], *, task: str, env_options: dict | None) -> str:
    """Markdown: per arm's final point (mean over seeds) the first-answer rule use and the turn outcomes."""
    finals: dict[tuple[str, int], int] = {}
    for r in evals:
        key = (r["arm"], int(r["seed"]))
        finals[key] = max(finals.get(key, -1), int(r["step"]))
    splits = sorted({r["split"] for r in evals}, key=lambda s: (s != "id", s))
    lines = [
        "## Why: the first answer's card values, and what the turns score (final points, mean over seeds)",
        "",
        "rule = the numbers written are the split's values; as 10 = J/Q/K written as 10 (the training rule).",
        "",
        "| arm | split | rule | as 10 | other | " + " | ".join(o.lower() for o in OUTCOMES) + " |",
        "|---|---|---|---|---|" + "---|" * len(OUTCOMES),
    ]
    from sftrl_jax.evaluation.study_report import NAMES, ORDER

    for arm in ORDER:
        for split in splits:
            uses, outs = [], []
            for (a, seed), step in sorted(finals.items()):
                if a != arm:
                    continue
                folder = os.path.join(study_dir, f"seed{seed}", "eval", f"{arm}_{step}", split)
                if not os.path.exists(os.path.join(folder, "turns.jsonl")):
                    continue
                uses.append(
                    rule_use(os.path.join(folder, "turns.jsonl"), task=task, split=split, env_options=env_options)
                )
                outs.append(outcomes(os.path.join(folder, "summary.json")))
            if not uses:
                continue
            mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
            cells = [f"{100 * mean(uses, k):.1f}%" for k in ("rule", "as_10", "other")]
            cells += [f"{100 * mean(outs, k):.1f}%" for k in OUTCOMES]
            lines.append(f"| {NAMES[arm]} | {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

"""SFT data generated from the environments' expert answers, in the reference's conversation JSON.

    generate_gp_sft("gp-vl", "train", 500, "data/gp_vl/train.json", seed=0)

writes ONE JSON array of examples
`{"id": ..., "image": "images/000000.png" (gp-vl only), "conversations": [{"from": "human", "value":
"<image>\\n" + prompt (gp-vl) or prompt (gp-l)}, {"from": "gpt", "value": expert answer}]}`; gp-vl
images are PNG files in `images/` beside the JSON file (give each data set its own directory: names
restart at 000000). The same seed gives the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sftrl_jax import envs, progress
from sftrl_jax.data import pretrain
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.general_points import expert

GP_VARIANTS = ("gp-l", "gp-vl")
IMAGE_MARKER = "<image>"


def generate_gp_sft(
    variant: str,
    split: str,
    n: int,
    out_path: str | os.PathLike,
    seed: int = 0,
    *,
    dealt_order: bool = False,
    revisions: float = 0.0,
    max_failed: int = 1,
    env_options: Mapping[str, Any] | None = None,
    diverse_rules: float = 0.0,
) -> dict[str, Any]:
    """Writes `n` GeneralPoints SFT examples to `out_path`; returns counts.

    `dealt_order`: the expert prefers formulas that use the numbers in dealt order (see
    `envs.general_points.expert`; easier for small models, off by default as in the reference).
    `revisions`: the fraction of examples that are revisions (failed attempts with the dealt
    numbers, each followed by the env's "You failed this trial because ..." feedback, then the
    expert answer; the failed tries are context, `"loss": false`, the loss is on the answer), so that
    small models learn to answer again, differently, after feedback
    (the paper's SFT data is single-turn: 0). `max_failed`: a revision has 1..`max_failed` failed
    attempts, uniformly (at most the env's `verify_iter` - 1, so that the answer is still graded),
    all different, as the later turns of an evaluation episode look. `env_options`: environment
    keywords, e.g. `{"template": PATH}`. `diverse_rules` (ours): the fraction of examples dealt and answered
    under a J/Q/K rule drawn as the pretraining corpus draws them (`data.pretrain.draw_rule`: any values
    1..13, never the rule-OOD split's 11/12/13), stated in the template's rule sentence with those values
    (the env option `face_values`); 0 keeps the split's rule in every example (the file is then the same
    as without the option)."""
    if variant not in GP_VARIANTS:
        raise EnvError(f"unknown GeneralPoints variant {variant!r}; valid: {', '.join(GP_VARIANTS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise EnvError(f"the number of examples must be a positive integer, got {n!r}")
    env = envs.make(variant, split=split, **dict(env_options or {}))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_dir = out.parent / "images"
    vision = variant == "gp-vl"
    if vision:
        image_dir.mkdir(exist_ok=True)
    if not 0.0 <= revisions <= 1.0:
        raise EnvError(f"revisions must be a fraction in [0, 1], got {revisions!r}")
    if not 0.0 <= diverse_rules <= 1.0:
        raise EnvError(f"diverse_rules must be a fraction in [0, 1], got {diverse_rules!r}")
    if isinstance(max_failed, bool) or not isinstance(max_failed, int) or not 1 <= max_failed < env.verify_iter:
        raise EnvError(
            f"max_failed must be an integer in 1..{env.verify_iter - 1} (the env's verify_iter - 1), got {max_failed!r}"
        )
    choice_rng = np.random.default_rng([seed, 1])  # which solution the expert writes
    revision_rng = np.random.default_rng([seed, 2])  # which examples are revisions, and their failed tries
    rule_rng = np.random.default_rng([seed, 3])  # which examples get another rule, which rule, their deal
    examples, hands, n_revisions, rules, n_diverse = [], set(), 0, set(), 0
    split_env, split_seed = env, seed  # the split's env is seeded on its first hand
    for i in progress.iterate(range(n), desc=f"{variant} {split}", unit="ex", enabled=n >= 100):
        if diverse_rules and rule_rng.random() < diverse_rules:
            rule = pretrain.draw_rule(rule_rng)
            rules.add(rule)
            n_diverse += 1
            env = envs.make(variant, split=split, **{**dict(env_options or {}), "face_values": rule})
            obs, info = env.reset(seed=int(rule_rng.integers(2**31)))
        else:
            env = split_env
            obs, info = env.reset(seed=split_seed)
            split_seed = None
        hands.add(tuple(sorted(info["cards"])))
        answer = expert.expert_answer(
            info["cards"], info["numbers"], info["target"], rng=choice_rng, dealt_order=dealt_order
        )
        example: dict[str, Any] = {"id": f"{variant}-{split}-{i:06d}"}
        prompt = obs["text"]
        if vision:
            rel = f"images/{i:06d}.png"
            obs["image"].save(out.parent / rel)
            example["image"] = rel
            prompt = f"{IMAGE_MARKER}\n{prompt}"
        turns = [{"from": "human", "value": prompt}]
        if revisions and revision_rng.random() < revisions:
            tried: set[str] = set()
            n_failed = 1 + int(revision_rng.integers(max_failed)) if max_failed > 1 else 1  # (1: the earlier stream)
            for _ in range(n_failed):
                failed = expert.failed_attempt(
                    info["cards"], info["numbers"], info["target"], rng=revision_rng, avoid=tried
                )
                tried.add(failed)
                feedback, *_ = env.step(failed)
                turns += [{"from": "gpt", "value": failed, "loss": False}, {"from": "human", "value": feedback["text"]}]
            n_revisions += 1
        example["conversations"] = [*turns, {"from": "gpt", "value": answer}]
        examples.append(example)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(examples, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    return {
        "variant": variant,
        "split": split,
        "examples": n,
        "images": n if vision else 0,
        "distinct_hands": len(hands),
        "seed": seed,
        "dealt_order": dealt_order,
        "revisions": n_revisions,
        "max_failed": max_failed,
        "diverse_rule_examples": n_diverse,
        "distinct_rules": len(rules),
    }

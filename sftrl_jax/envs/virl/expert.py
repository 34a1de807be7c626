"""The expert (ground-truth) answer of a waypoint, and SFT data in the reference conversation format.

An expert answer is the three-key JSON of the prompt's [Output] section, e.g.

    {
      "current observation": "Titon Bank is on your right front; You observe an intersection",
      "current instruction": "Turn right to face southeast.",
      "action": "turn_direction(southeast)"
    }

"current observation" is the oracle text of the waypoint in both variants (for V-IRL-VL it is what a
perfect reader of the image would report). `generate_virl_sft` walks expert episodes and writes one
example per waypoint into ONE JSON array:

    [{"id": "virl-vl-train-000000", "image": "images/virl-vl-train-000000.png",   # VL only
      "conversations": [{"from": "human", "value": "<image>\\n[Task Description] ..."},
                        {"from": "gpt", "value": "{\\n  \\"current observation\\": ..."}]}, ...]

Images are saved beside the JSON under `images/`, referenced by relative paths.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
from collections.abc import Mapping
from typing import Any

from sftrl_jax import progress
from sftrl_jax.envs.base import EnvError
from sftrl_jax.envs.virl import env as virl_env

VARIANTS = ("virl-l", "virl-vl")
IMAGE_TOKEN = "<image>"


def expert_answer(info: Mapping[str, Any]) -> str:
    """The expert reply for the waypoint described by an env `info` dict."""
    answer = {
        "current observation": info["current_obs"],
        "current instruction": info["current_instruction"],
        "action": info["gt_action"],
    }
    return json.dumps(answer, indent=2, ensure_ascii=False)


def generate_virl_sft(
    variant: str, split: str, n: int, out_path: str | os.PathLike, seed: int = 0, **env_options: Any
) -> dict[str, Any]:
    """Writes `n` SFT examples (one per waypoint of expert episodes) to `out_path` as one JSON array.

    Routes are visited in a seeded random order (every route once before any repeats); the rail's
    dropped points are drawn from the same seed, so the file is reproducible. Returns a summary dict:
    path, n_examples, n_episodes, n_images, variant, split.
    """
    if variant not in VARIANTS:
        raise EnvError(f"unknown V-IRL variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EnvError(f"n must be a positive integer, got {n!r}")
    make = virl_env.make_virl_l if variant == "virl-l" else virl_env.make_virl_vl
    env = make(split, seed=seed, **env_options)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    vision = variant == "virl-vl"
    if vision:
        (out_path.parent / "images").mkdir(exist_ok=True)

    order_rng = random.Random(seed)
    order: list[int] = []
    examples: list[dict] = []
    episodes = 0
    with progress.bar(total=n, desc=f"{variant} {split} SFT", unit="ex") as bar:
        while len(examples) < n:
            if not order:
                order = list(range(env.n_routes))
                order_rng.shuffle(order)
            obs, info = env.reset(options={"route_idx": order.pop()})
            episodes += 1
            while len(examples) < n:
                ex_id = f"{variant}-{split}-{len(examples):06d}"
                answer = expert_answer(info)
                example: dict[str, Any] = {"id": ex_id}
                text = obs["text"]
                if vision:
                    rel = f"images/{ex_id}.png"
                    obs["image"].save(out_path.parent / rel, compress_level=1)
                    example["image"] = rel
                    text = f"{IMAGE_TOKEN}\n{text}"
                example["conversations"] = [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
                examples.append(example)
                bar.update(1)
                obs, _, terminated, truncated, info = env.step(answer)
                if terminated or truncated:
                    break
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(examples, f, ensure_ascii=False, indent=1)
    os.replace(tmp, out_path)
    return {
        "path": str(out_path),
        "n_examples": len(examples),
        "n_episodes": episodes,
        "n_images": len(examples) if vision else 0,
        "variant": variant,
        "split": split,
    }

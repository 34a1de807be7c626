"""Fixed GeneralPoints prompts as one-turn evaluation episodes (the study's base probe).

    items = pretrain.probe(234, rule=(11, 12, 13))   # each {"prompt", "values", "symbols", "target"}
    summary = prompt_set.evaluate(policy, tokenizer, items, name="held_out_rule", batch_size=64)
    summary["success_rate"], summary["success_rate_stderr"], summary["episodes"]

Episode i is items[i]'s prompt as it stands (its own wording, no template), answered once and scored
by the GeneralPoints verifier against items[i]'s hand and target. The episodes go through
`evaluate.evaluate` like any split: the same episode runner, batching, policy and GP summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sftrl_jax.envs.general_points import verifier
from sftrl_jax.evaluation import evaluate as ev


class PromptEnv:
    """`reset(seed=i)` poses items[i]; `step(text)` scores the one answer and ends the episode."""

    def __init__(self, items: Sequence[dict[str, Any]]):
        self.items = items
        self.puzzle: verifier.Puzzle | None = None

    def reset(self, seed: int | None = None, options: dict | None = None):
        item = self.items[int(seed or 0)]
        self.puzzle = verifier.Puzzle(item["values"], item["symbols"], item["target"])
        return {"text": item["prompt"], "image": None}, {}

    def step(self, text: str):
        verdict = verifier.score(text, self.puzzle)
        info = {"verify_message": verdict.message, "outcome": verdict.outcome}
        return {"text": "", "image": None}, verdict.reward, verdict.is_correct, not verdict.is_correct, info


def evaluate(
    policy,
    tokenizer,
    items: Sequence[dict[str, Any]],
    *,
    name: str,
    batch_size: int,
    progress: bool = False,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """One turn per item, answered by `policy`, summarised as a GP-L split named `name` (`evaluate.summarize`)."""
    # seed 0: episode i is reset with seed i (`evaluate.make_runner`), i.e. items[i]
    proto = ev.EvalProtocol("gp-l", name, len(items), seed=0, verify_iter=1)
    make_env = lambda: PromptEnv(items)  # noqa: E731
    return ev.evaluate(
        policy, tokenizer, proto, batch_size=batch_size, progress=progress, out_dir=out_dir, make_env=make_env
    )

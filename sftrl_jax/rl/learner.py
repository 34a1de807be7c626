"""The interface of an RL algorithm's learner, and what every learner shares.

A learner (`ppo.PPOLearner`, `grpo.GRPOLearner`) owns its algorithm: the model it trains (with or
without a value head), its jitted update step and no-gradient pass, how it collects turns, and how
it turns them into optimiser steps. The loop (`rl.train.Trainer`) owns everything else (mesh,
parameters, optimiser, rollouts' policy, evaluation, checkpoints) and calls `update()` once per
update. Shared here: the steps over built batches, the old / reference token log-prob tables in the
first step's layout, and the per-update statistics (the env package's own via `envs.rl_hooks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sftrl_jax import envs
from sftrl_jax.episodes import Turn
from sftrl_jax.evaluation import compute as compute_lib
from sftrl_jax.rl import batching


class Learner:
    """One algorithm's update over the loop's shared state (`loop`: the `rl.train.Trainer`)."""

    name: str = ""

    def __init__(self, loop, cfg):
        self.loop, self.cfg = loop, cfg
        self.temperature = loop.cfg.sampling.temperature  # the run's one temperature (sampler and losses)
        self.hooks = envs.rl_hooks(loop.cfg.env.task)

    # -- the interface ---------------------------------------------------------------------------

    @staticmethod
    def policy_module(model, *, seed: int):
        """The module whose parameters the run trains (the language model, or it with a head)."""
        return model

    @staticmethod
    def language_model(module):
        """The language model inside `policy_module`'s module (for sampling and the final save)."""
        return module

    def update(self) -> dict[str, float]:
        """One update: collect turns with the loop's current policy, then optimiser steps."""
        raise NotImplementedError

    def state(self) -> dict[str, Any] | None:
        """JSON state that must survive a checkpoint (None: the learner keeps nothing across updates)."""
        return None

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Restores `state()` from a checkpoint."""

    def no_grad_logp(self, params, batch):
        """(token log-probs [B, L],) of the training forward without gradients."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------

    def token_logps_of(self, turns: Sequence[Turn], params=None, steps=None) -> list[np.ndarray]:
        """The training forward's token log-probs of each turn's response under `params` (default: the
        current ones; `loop.ref_params` for the KL reference), in micro-batches laid out as `steps`
        (`batching.Batcher.rows_of`)."""
        params = self.loop.state.params if params is None else params
        rows = self.loop.batcher.rows_of(turns, self.cfg.micro_batch, lambda b: self.no_grad_logp(params, b), steps)
        return [batching.response_row(t, logp) for t, (logp,) in zip(turns, rows)]

    def ref_table(self, turns: Sequence[Turn], steps=None) -> dict[int, np.ndarray] | None:
        """id(turn) -> the reference policy's token log-probs (None without a KL penalty)."""
        if self.loop.ref_params is None:
            return None
        return {id(t): lp for t, lp in zip(turns, self.token_logps_of(turns, self.loop.ref_params, steps))}

    def train_steps(
        self,
        steps: Iterable[tuple[int, list[Turn], dict[str, np.ndarray]]],
        *,
        old_of: dict[int, np.ndarray] | None,
        ref_of: dict[int, np.ndarray] | None,
    ) -> list[dict[str, float]]:
        """Runs the optimiser steps (epoch, turns, extra arrays): each batch built from its turns, the
        ratio's old token log-probs from `old_of` (None: the sampler's, as built) and the reference's
        from `ref_of`; returns each step's metrics."""
        loop = self.loop
        metrics = []
        for epoch, turns, extra in steps:
            batch = loop.batcher.build(turns)
            batch.update(extra)
            if old_of is not None:
                batching.put_token_logp(batch, "old_token_logp", turns, old_of)
            if ref_of is not None:
                batching.put_token_logp(batch, "ref_token_logp", turns, ref_of)
            loop.state, m = self.update_fn(loop.state, loop.batcher.device(batch))
            m = {k: float(v) for k, v in m.items()}
            m["epoch"] = epoch
            metrics.append(m)
            loop.compute.add_train(int(batch["attention_mask"].sum()), n_images=sum(len(t.images) for t in turns))
        return metrics

    def count_generation(self, turns: Sequence[Turn]) -> None:
        for t in turns:
            self.loop.compute.add_generation(len(t.context_ids), len(t.response_ids))

    def rollout_stats(self, turns: Sequence[Turn], t_roll: float, t_train: float) -> dict[str, float]:
        """The update's rollout statistics: the loop's own, then the env package's (`turn_stats`)."""
        loop = self.loop
        rewards = [t.reward for t in turns]
        done = [t for t in turns if t.done]
        gen_tokens = sum(len(t.response_ids) for t in turns)
        n, c = loop.n_params, loop.compute
        out = {
            "turns": len(turns),
            "episodes_finished": len(done),
            "success_rate": (sum(1 for t in done if t.solved) / len(done)) if done else float("nan"),
            "reward_mean": float(np.mean(rewards)),
            "response_tokens_mean": gen_tokens / max(len(turns), 1),
            "rollout_tokens_per_s": gen_tokens / max(t_roll, 1e-9),
            "rollout_seconds": t_roll,
            "train_seconds": t_train,
            "gflops": c.flops(rl=True) / 1e9,
            "gflops_paper_lambda": (
                6 * n * (c.d_init + c.trained_tokens)
                + 2 * n * compute_lib.lambda_for(loop.cfg.env.task) * c.trained_tokens
            )
            / 1e9,
        }
        sources = [t.info["reward_source"] for t in turns if "reward_source" in t.info]
        if sources:  # env.reward_on_device: the share scored on the device, host rewards that differed
            out["reward_device_share"] = sources.count("device") / len(sources)
            out["reward_device_mismatch"] = sum(bool(t.info.get("reward_device_mismatch")) for t in turns)
        out.update(self.hooks.turn_stats(turns))
        return out


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """The update's metrics from its steps': the max of `*_max` keys, the mean of the others."""
    keys = rows[0].keys() if rows else ()
    return {
        k: float(np.max([r[k] for r in rows]) if k.endswith("_max") else np.mean([r[k] for r in rows])) for k in keys
    }

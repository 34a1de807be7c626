"""The RL loop: set-up, rollouts through a learner per algorithm, evaluation, checkpoints, resume.

    sftrl rl --config configs/rl/gp_l_tiny.yaml

`Trainer` is the RL job of the one run harness (`train.run.Run`: mesh, model, optimiser, train
state, checkpoints, resume, SIGTERM, snapshots, `final`): the model is the algorithm's
`learner.policy_module` (with a value head for PPO), and the algorithm's learner (the registry
`rl.config.ALGORITHMS`: `ppo.PPOLearner`, `grpo.GRPOLearner`, one interface, `learner.Learner`) is
called once per update. PPO (the paper): every update collects `train.steps_per_update` lock-step turns
from each of `env.num_envs` environments (episodes continue across updates, as in RL4VLM), computes
values and GAE, and runs `ppo.epochs` passes of clipped updates. GRPO: every update plays
`grpo.group_size` episodes of each of `train.prompts_per_update` prompts (same hand / route within a
group) and updates on all their turns with group-normalised advantages.

Resume: the latest checkpoint holds params (policy + value head), optimiser, update count, RNG
and compute counters, and the learner's own state (PPO, whose episodes run across updates: the
rollout state as JSON, per environment the seed and options of its current episode and the answers
given so far, `episodes.EpisodeRunner.state`). On resume the episodes are replayed to rebuild every
env and conversation exactly (each replayed reward is checked against the saved one). All other
randomness derives from (run seed, update index): the sampler's seed, the mini-batch order, the
seeds of new episodes. So a run killed after the checkpoint of update k and resumed logs the same
metrics for updates k+1.. as an uninterrupted run (tested with SIGKILL). SIGTERM saves and exits 0.
An environment that raises or returns a malformed observation or reward stops the run with an
`episodes.RolloutError` naming the env, the episode and the turn; checkpoints already written are
kept. As in SFT, the run folder is locked for the run (`train/run_lock.py`), snapshots and `final`
are written atomically (each snapshot before the checkpoint of its update), and a failed save stops
the run with one line (`errors.SaveError`).
"""

from __future__ import annotations

import os
from typing import Any

from sftrl_jax.config import ConfigError
from sftrl_jax.evaluation import evaluate as eval_lib
from sftrl_jax.evaluation import report as report_lib
from sftrl_jax.evaluation.compute import ComputeCounter
from sftrl_jax.rl import config as rl_config
from sftrl_jax.sampling import policy as policy_lib
from sftrl_jax.train.run import Run


class Trainer:
    """The RL job: `run()` loops over the updates in the harness, `update()` is one of them."""

    unit = "update"

    def __init__(self, cfg: rl_config.RLConfig):
        self.cfg, t = cfg, cfg.train
        learner_cls = cfg.learner_class
        self.harness = Run(
            cfg,
            name="rl",
            optim=cfg.optim,
            total_steps=t.updates * cfg.updates_steps(),
            wrap=lambda model: learner_cls.policy_module(model, seed=t.seed),
            exact=True,
            check_mesh=lambda mesh: rl_config.check_mesh(cfg, mesh),
            rewind=(report_lib.EVALS_FILE,),
            reference=cfg.algo_cfg.kl_coef > 0,
        )
        try:
            h = self.harness
            if cfg.env.task.endswith("-vl") and h.image_processor is None:
                raise ConfigError(f"env.task {cfg.env.task} has images but the model has no vision tower")
            self.compute = ComputeCounter(n_params=h.n_params, d_init=t.d_init)
            if h.resumed is not None:
                self.compute = ComputeCounter.from_state(h.extra["compute"])
            self.learner = learner_cls(h, cfg, self.compute)
            self.learner.load_state(h.extra.get("rollout"))
        except BaseException:
            self.harness.close()
            raise

    @property
    def update_idx(self) -> int:
        return self.harness.step

    @property
    def state(self):
        return self.harness.state

    # -- the job (train.run.Run.loop) ------------------------------------------------------------

    def begin(self) -> None:
        if self.update_idx == 0 and self.cfg.eval.every:
            self.evaluate()

    def step(self, i: int) -> tuple[dict[str, float], bool]:
        m = self.update()
        return m, m.get("finite", 1.0) == 1.0

    def postfix(self, row: dict[str, float]) -> dict[str, str]:
        return {"success": f"{row['success_rate']:.2f}", "reward": f"{row['reward_mean']:.2f}"}

    def after(self, done: int) -> None:
        every = self.cfg.eval.every
        if every and done % every == 0 and done < self.cfg.train.updates:
            self.evaluate()

    def extra_state(self) -> dict[str, Any]:
        extra = {"compute": self.compute.state()}
        learner_state = self.learner.state()
        if learner_state is not None:
            extra["rollout"] = learner_state
        return extra

    def finish(self) -> None:
        if self.cfg.eval.every or self.cfg.eval.splits:
            self.evaluate()

    # -- the updates -----------------------------------------------------------------------------

    def update(self) -> dict[str, float]:
        """One update of the run's algorithm (collect, then optimiser steps); returns its metrics."""
        return self.learner.update()

    def evaluate(self, writer=None) -> list[dict]:
        """Evaluates the current policy on `eval.splits`; logs each to `writer` (default: the run's)."""
        e, h = self.cfg.eval, self.harness
        writer = writer or h.writer
        rows = []
        policy = policy_lib.make_policy(
            self.learner.lm(),
            h.tokenizer,
            self.cfg.sampling,
            seed=self.cfg.train.seed + 17,
            image_processor=h.image_processor,
            temperature=e.temperature,
        )
        for split in e.splits:
            proto = eval_lib.protocol(self.cfg.env.task, split, n_episodes=e.episodes)
            summary = eval_lib.evaluate(
                policy,
                h.tokenizer,
                proto,
                batch_size=e.batch_size,
                progress=self.cfg.train.progress and h.lead,
                out_dir=os.path.join(self.cfg.train.run_dir, "eval", f"update{self.update_idx}", split)
                if h.lead
                else None,
                env_options=rl_config.eval_env_options(self.cfg.env.options),
            )
            # every process evaluates (its share of the envs) and logs the same row; process 0 keeps it
            kw = dict(arm="rl" if self.update_idx else "init", step=self.update_idx, summary=summary)
            kw["gflops"] = self.compute.flops(rl=True) / 1e9
            row = report_lib.append_eval(self.cfg.train.run_dir, **kw) if h.lead else report_lib.eval_row(**kw)
            if writer is not None:
                writer.write(self.update_idx, {f"{split}/{row['metric']}": row["value"]}, prefix="eval")
            rows.append(row)
        return rows

    def run(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Runs (or resumes) the updates; returns the last logged metrics."""
        t = self.cfg.train
        return self.harness.loop(
            self, total=t.updates, max_bad=t.max_bad_updates, final=self.learner.lm, stop_after=stop_after
        )

    def close(self) -> None:
        """Waits for the checkpoint writes (SaveError if one failed) and releases the run folder."""
        self.harness.close()


def train(cfg: rl_config.RLConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    return Trainer(cfg).run(stop_after=stop_after)

"""The RL loop: set-up, rollouts through a learner per algorithm, evaluation, checkpoints, resume.

    sftrl rl --config configs/rl/gp_l_tiny.yaml

`Trainer` builds the mesh, the model (`learner.policy_module`: with a value head for PPO), the
optimiser and the train state, restores the latest checkpoint, and then calls the algorithm's
learner once per update (`LEARNERS`: `ppo.PPOLearner`, `grpo.GRPOLearner`, one interface,
`learner.Learner`). PPO (the paper): every update collects `train.steps_per_update` lock-step turns
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

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax import config as config_lib
from sftrl_jax import envs, ops
from sftrl_jax import progress as progress_lib
from sftrl_jax.config import ConfigError
from sftrl_jax.data import processor
from sftrl_jax.envs import device_scoring
from sftrl_jax.errors import UserError
from sftrl_jax.evaluation import evaluate as eval_lib
from sftrl_jax.evaluation import report as report_lib
from sftrl_jax.evaluation.compute import ComputeCounter
from sftrl_jax.parallel import distributed, placement
from sftrl_jax.parallel import mesh as mesh_lib
from sftrl_jax.rl import batching
from sftrl_jax.rl import config as rl_config
from sftrl_jax.rl import grpo as grpo_lib
from sftrl_jax.rl import ppo as ppo_lib
from sftrl_jax.sampling import policy as policy_lib
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train import metrics as metrics_lib
from sftrl_jax.train import optim as optim_lib
from sftrl_jax.train import run_lock
from sftrl_jax.train.state import TrainState, abstract_like, load_model, rng_data, tokenizer_for

LEARNERS = {"ppo": ppo_lib.PPOLearner, "grpo": grpo_lib.GRPOLearner}


class Trainer:
    """Holds the run's state; `run()` does the updates, `learner.update()` one of them."""

    def __init__(self, cfg: rl_config.RLConfig):
        self.cfg = cfg
        distributed.maybe_initialize(auto=cfg.train.distributed)
        # one run per folder: a second one stops here, writing nothing; released by run() or close()
        self._lock = run_lock.acquire(cfg.train.run_dir)
        try:
            self._build()
        except BaseException:
            self._lock.release()
            raise

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.lead = jax.process_index() == 0  # the process that writes the run's files
        os.makedirs(t.run_dir, exist_ok=True)
        if self.lead:
            config_lib.dump_yaml(cfg, os.path.join(t.run_dir, "config.yaml"))
        devices = jax.devices() if t.devices is None else jax.devices()[: t.devices]
        self.mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec(t.mesh), devices=devices)
        rl_config.check_mesh(cfg, self.mesh)
        self.tokenizer = tokenizer_for(cfg.model)
        model = load_model(cfg.model, mesh=self.mesh, seed=t.seed)
        self.image_processor = processor.for_model(model)
        if cfg.env.task.endswith("-vl") and self.image_processor is None:
            raise ConfigError(
                f"env.task {cfg.env.task} has images but the model {type(model).__name__} has no vision tower"
            )
        learner_cls = LEARNERS[cfg.algo]
        self._language_model = learner_cls.language_model
        self.graphdef, params, self.rest = nnx.split(learner_cls.policy_module(model, seed=t.seed), nnx.Param, ...)
        params = placement.on_mesh(params, self.mesh)
        # The frozen reference of the KL penalty (`ppo.kl_coef` / `grpo.kl_coef` > 0): the policy the
        # run starts from (model.init), copied before a resume replaces the parameters.
        self.ref_params = jax.tree.map(jnp.copy, params) if cfg.algo_cfg.kl_coef > 0 else None
        self.n_params = placement.param_count(params)
        total = t.updates * cfg.updates_steps()
        self.lr_fn = optim_lib.schedule(cfg.optim, total)
        self.tx = optim_lib.make_optimizer(cfg.optim, params, total_steps=total)
        with jax.set_mesh(self.mesh):
            opt_state = optim_lib.init_state(self.tx, params, self.mesh)
        self.state = placement.on_mesh(
            TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=rng_data(t.seed)), self.mesh
        )
        self.compute = ComputeCounter(n_params=self.n_params, d_init=t.d_init)
        self.update_idx = 0
        self.resumed: int | None = None  # the update of the checkpoint this run continues from
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(t.run_dir, "checkpoints"), keep=t.keep, every=t.save_every, async_save=t.async_checkpointing
        )
        extra: dict[str, Any] = {}
        if t.resume and self.checkpointer.latest_step() is not None:
            step, self.state, extra = self.checkpointer.restore_latest(abstract_like(self.state))
            self.update_idx = self.resumed = int(step)
            self.compute = ComputeCounter.from_state(extra["compute"])
            print(f"rl: resumed {t.run_dir} at update {self.update_idx}")
        # each update logged once: rows after the checkpoint are logged again (metrics.rewind)
        metrics_lib.rewind(os.path.join(t.run_dir, self.metrics_file()), checkpoint_step=self.resumed)
        if self.resumed is not None and self.lead:  # so are the evaluations after it
            metrics_lib.rewind(os.path.join(t.run_dir, report_lib.EVALS_FILE), checkpoint_step=self.resumed)
        self.state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        # The training passes (update step, values / log-prob pass, reference pass) run their fp32
        # products on OpenBLAS on one CPU device, but not the causal-attention / RoPE kernels or fused
        # projections (`exact`): with those the update step's first log-probs were no longer bitwise
        # those of the passes that gave the ratio's old log-probs (tests/rl/test_rl_train.py's layout
        # tests: ratio 1 +- 2.4e-7). The passes are also compiled without YNNPACK fusions.
        self.ops_policy = ops.policy_for(self.mesh, exact=True)
        self.compiler_options = ops.exact_compiler_options(self.ops_policy, enabled=t.exact_cpu_passes)
        self.batcher = batching.Batcher(
            self.tokenizer, self.mesh, cfg.ppo, buckets=t.length_buckets, image_processor=self.image_processor
        )
        self.envs = [envs.make(cfg.env.task, split=cfg.env.split, **cfg.env.options) for _ in range(cfg.env.num_envs)]
        # env.reward_on_device: the rollouts' rewards from one compiled program after sampling (or None)
        self.reward_scorer = device_scoring.make_scorer(
            cfg.env.reward_on_device, cfg.env.task, cfg.env.options, self.tokenizer, width=cfg.sampling.max_new_tokens
        )
        self.learner = learner_cls(self)
        self.learner.load_state(extra.get("rollout"))

    # -- what the learners use -------------------------------------------------------------------

    def compile(self, fn, **jit_kwargs):
        """`fn` jitted as an RL training pass (under `ops_policy`, with `compiler_options`)."""
        return jax.jit(ops.traced_with(fn, self.ops_policy), compiler_options=self.compiler_options, **jit_kwargs)

    def lm(self):
        """The current language model (shares the train state's arrays; no copy)."""
        return self._language_model(nnx.merge(self.graphdef, self.state.params, self.rest))

    def policy(self, temperature=None, seed_offset: int = 0):
        """The sampler at the current parameters: the rollouts' policy (seeded per update)."""
        return policy_lib.make_policy(
            self.lm(),
            self.tokenizer,
            self.cfg.sampling,
            seed=self.cfg.train.seed * 7919 + self.update_idx * 104729 + seed_offset,
            image_processor=self.image_processor,
            temperature=temperature,
        )

    def metrics_file(self) -> str:
        """metrics.jsonl (process 0; the others' copies as metrics.process<i>.jsonl, as in SFT)."""
        p = jax.process_index()
        return "metrics.jsonl" if p == 0 else f"metrics.process{p}.jsonl"

    def episode_seed(self, episode: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + self.update_idx) * 100_003 + episode

    # -- the loop --------------------------------------------------------------------------------

    def update(self) -> dict[str, float]:
        """One update of the run's algorithm (collect, then optimiser steps); returns its metrics."""
        return self.learner.update()

    def evaluate(self, writer) -> list[dict]:
        e = self.cfg.eval
        rows = []
        policy = policy_lib.make_policy(
            self.lm(),
            self.tokenizer,
            self.cfg.sampling,
            seed=self.cfg.train.seed + 17,
            image_processor=self.image_processor,
            temperature=e.temperature,
        )
        for split in e.splits:
            proto = eval_lib.protocol(self.cfg.env.task, split, n_episodes=e.episodes)
            summary = eval_lib.evaluate(
                policy,
                self.tokenizer,
                proto,
                batch_size=e.batch_size,
                progress=self.cfg.train.progress and self.lead,
                out_dir=os.path.join(self.cfg.train.run_dir, "eval", f"update{self.update_idx}", split)
                if self.lead
                else None,
                env_options=rl_config.eval_env_options(self.cfg.env.options),
            )
            # every process evaluates (its share of the envs) and logs the same row; process 0 keeps it
            kw = dict(arm="rl" if self.update_idx else "init", step=self.update_idx, summary=summary)
            kw["gflops"] = self.compute.flops(rl=True) / 1e9
            row = report_lib.append_eval(self.cfg.train.run_dir, **kw) if self.lead else report_lib.eval_row(**kw)
            writer.write(self.update_idx, {f"{split}/{row['metric']}": row["value"]}, prefix="eval")
            rows.append(row)
        return rows

    def save(self) -> None:
        extra = {"compute": self.compute.state()}
        learner_state = self.learner.state()
        if learner_state is not None:
            extra["rollout"] = learner_state
        if self.checkpointer.latest_step() != self.update_idx:
            self.checkpointer.save(self.update_idx, self.state, extra)

    def run(self, *, stop_after: int | None = None) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        writer = metrics_lib.MetricsWriter(
            t.run_dir, filename=self.metrics_file(), tensorboard=t.tensorboard and self.lead
        )
        last: dict[str, Any] = {}
        bad = 0
        bar = progress_lib.bar(
            total=t.updates,
            initial=self.update_idx,
            desc=f"rl {cfg.algo}",
            unit="update",
            enabled=t.progress and self.lead,
        )
        done_now = 0
        try:
            with ckpt_lib.PreemptionGuard() as guard, jax.set_mesh(self.mesh):
                if self.update_idx == 0 and cfg.eval.every:
                    self.evaluate(writer)
                while self.update_idx < t.updates:
                    m = self.update()
                    self.update_idx += 1
                    done_now += 1
                    bad = 0 if m.get("finite", 1.0) == 1.0 else bad + 1
                    if bad >= t.max_bad_updates:
                        raise UserError(
                            f"rl: {bad} updates in a row had non-finite gradients; aborting (last "
                            f"checkpoint: update {self.checkpointer.latest_step()})"
                        )
                    last = writer.write(self.update_idx, m, prefix="train")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(success=f"{m['success_rate']:.2f}", reward=f"{m['reward_mean']:.2f}")
                    if cfg.eval.every and self.update_idx % cfg.eval.every == 0 and self.update_idx < t.updates:
                        self.evaluate(writer)
                    # the snapshot before the checkpoint: a run resumed from the checkpoint has it
                    snapshot = ckpt_lib.snapshot_path(t.run_dir, self.update_idx, every=t.snapshot_every)
                    if snapshot is not None:
                        self.save_model(snapshot)
                    if self.update_idx % t.save_every == 0:
                        self.save()
                    self.checkpointer.check()  # a background save that failed stops the run now
                    if _any_process(guard.requested):
                        self.save()
                        print(f"rl: SIGTERM received; saved update {self.update_idx}; exiting")
                        return last
                    if stop_after is not None and done_now >= stop_after:
                        return last
                self.save()
                if cfg.eval.every or cfg.eval.splits:
                    self.evaluate(writer)
                self.checkpointer.wait()  # the last checkpoint is on disk before `final` says the run is done
                self.save_final()
        finally:
            try:
                self.close()
            finally:
                writer.close()
                if bar is not None:
                    bar.close()
        return last

    def close(self) -> None:
        """Waits for the checkpoint writes (SaveError if one failed) and releases the run folder."""
        try:
            self.checkpointer.close()
        finally:
            self._lock.release()

    def save_final(self) -> str:
        return self.save_model(os.path.join(self.cfg.train.run_dir, "final"))

    def save_model(self, path: str) -> str:
        """The current language model (no value head) as a model checkpoint at `path` (final, or a
        `train.snapshot_every` snapshot)."""
        from sftrl_jax.models.checkpoint import save_checkpoint

        save_checkpoint(self.lm(), path)
        return path


def train(cfg: rl_config.RLConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    return Trainer(cfg).run(stop_after=stop_after)


def _any_process(flag: bool) -> bool:
    """`flag` on any process (SIGTERM may reach the processes at different updates: all stop together)."""
    if jax.process_count() == 1:
        return flag
    return any(distributed.allgather_objects(bool(flag)))

"""The RL loop: multi-turn rollouts with sequential revision, then PPO or GRPO updates.

    sftrl rl --config configs/rl/gp_l_tiny.yaml

PPO (the paper): every update collects `train.steps_per_update` lock-step turns from each of
`env.num_envs` environments (episodes continue across updates, as in RL4VLM), computes values and
GAE, and runs `ppo.epochs` passes of clipped updates. GRPO: every update plays `grpo.group_size`
episodes of each of `train.prompts_per_update` prompts (same hand / route within a group) and
updates on all their turns with group-normalised advantages.

Resume: the latest checkpoint holds params (policy + value head), optimiser, update count, RNG
and compute counters, and (PPO, whose episodes run across updates) the rollout state as JSON: per
environment the seed and options of its current episode and the answers given so far
(`rollout.EpisodeRunner.state`). On resume the episodes are replayed to rebuild every env and
conversation exactly (each replayed reward is checked against the saved one). All other randomness
derives from (run seed, update index): the sampler's seed, the mini-batch order, the seeds of new
episodes. So a run killed after the checkpoint of update k and resumed logs the same metrics for
updates k+1.. as an uninterrupted run (tested with SIGKILL). GRPO plays whole episodes within an
update, so it has no rollout state. SIGTERM saves and exits 0. An environment that raises or returns
a malformed observation or reward stops the run with a `rollout.RolloutError` naming the env, the
episode and the turn; checkpoints already written are kept.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax import config as config_lib
from sftrl_jax import envs
from sftrl_jax.config import ConfigError
from sftrl_jax.data import processor
from sftrl_jax.errors import UserError
from sftrl_jax.evaluation import evaluate as eval_lib
from sftrl_jax.evaluation import report as report_lib
from sftrl_jax.evaluation.compute import LAMBDA, ComputeCounter
from sftrl_jax.models.layers import with_cpu_gemm
from sftrl_jax.parallel import distributed
from sftrl_jax.parallel import mesh as mesh_lib
from sftrl_jax.rl import grpo as grpo_lib
from sftrl_jax.rl import ppo as ppo_lib
from sftrl_jax.rl import rollout
from sftrl_jax.rl.value_head import PolicyWithValue, ValueHead
from sftrl_jax.sft.train import global_batch, on_mesh, param_count, use_cpu_gemm
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train import metrics as metrics_lib
from sftrl_jax.train import optim as optim_lib
from sftrl_jax.train.state import ModelSection, TrainState, abstract_like, load_model, rng_data, tokenizer_for

BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "targets",
    "resp_mask",
    "weights",
    "old_token_logp",
    "value_index",
    "old_values",
    "advantages",
    "returns",
    "ref_token_logp",
    "pixel_values",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
    "cross_attention_mask",
)


@dataclasses.dataclass(frozen=True)
class EnvSection:
    task: Literal["gp-l", "gp-vl", "virl-l", "virl-vl"] = "gp-l"
    split: Literal["train", "id", "ood-rule", "ood-visual"] = "train"
    num_envs: int = 8  # environments stepped in lock-step (one batched sampling call per turn)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # env options, e.g. verify_iter


# Env options that say how the model is prompted and graded (not what a split's rules are): the
# in-run evaluation uses them too, so a policy trained on another prompt wording is evaluated on it.
# Rule options (face_cards_as_10, target, verify_iter, ...) stay the evaluation split's own.
EVAL_ENV_KEYS = ("template", "data_dir", "exact", "reference_card_parsing", "fix_turn_wrap", "fix_intersection_check")


def eval_env_options(options: dict[str, Any]) -> dict[str, Any]:
    """The part of the training env's `options` that evaluation keeps (see `EVAL_ENV_KEYS`)."""
    return {k: v for k, v in options.items() if k in EVAL_ENV_KEYS}


@dataclasses.dataclass(frozen=True)
class SamplingSection:
    max_new_tokens: int = 512  # paper: 512 during RL
    temperature: float = 0.2  # paper: 0.2
    top_p: float = 1.0
    top_k: int = 0


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every: int = 0  # updates between evaluations (0 = only at the end)
    splits: tuple[str, ...] = ("id", "ood-rule")
    episodes: int | None = None  # None = the paper's protocol size
    temperature: float = 0.0  # greedy evaluation
    batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class RLTrainSection:
    run_dir: str = "runs/rl"
    updates: int = 20  # paper: num_updates (20 GP, 15 V-IRL)
    steps_per_update: int = 256  # PPO: lock-step turns per env per update (paper: num_steps 256)
    prompts_per_update: int = 8  # GRPO: groups per update
    length_buckets: tuple[int, ...] = (256, 512, 1024, 2048)  # padded lengths of training samples
    seed: int = 0
    mesh: str = "data=1,fsdp=-1,tensor=1"
    devices: int | None = None
    save_every: int = 1  # updates
    keep: int = 3
    resume: bool = True
    max_bad_updates: int = 3
    tensorboard: bool = False
    progress: bool = True
    distributed: bool = False
    d_init: int = 0  # tokens of the SFT that produced model.init (compute axis)
    async_checkpointing: bool = True
    # CPU: the training passes compiled without YNNPACK fusions, so the first update's ratio is
    # exactly 1 (`rl_compiler_options`); false: ~20-35% faster passes at the tiny configs' sizes.
    exact_cpu_passes: bool = True


@dataclasses.dataclass(frozen=True)
class RLConfig:
    model: ModelSection
    algo: Literal["ppo", "grpo"] = "ppo"
    env: EnvSection = dataclasses.field(default_factory=EnvSection)
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    ppo: ppo_lib.PPOConfig = dataclasses.field(default_factory=ppo_lib.PPOConfig)
    grpo: grpo_lib.GRPOConfig = dataclasses.field(default_factory=grpo_lib.GRPOConfig)
    optim: optim_lib.OptimConfig = dataclasses.field(
        default_factory=lambda: optim_lib.OptimConfig(lr=1e-6, eps=1e-7, grad_clip=0.01, min_lr=1e-9, warmup_ratio=0.0)
    )
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    train: RLTrainSection = dataclasses.field(default_factory=RLTrainSection)

    def __post_init__(self):
        if self.algo == "ppo" and (self.env.num_envs * self.train.steps_per_update) % self.ppo.samples_per_step:
            raise ConfigError(
                f"env.num_envs x train.steps_per_update ({self.env.num_envs} x {self.train.steps_per_update}) "
                f"must be a multiple of ppo.samples_per_step ({self.ppo.samples_per_step})"
            )
        if self.sampling.temperature <= 0:
            raise ConfigError("sampling.temperature must be positive during RL (log-probs use logits / temperature)")

    @property
    def algo_cfg(self):
        return self.ppo if self.algo == "ppo" else self.grpo

    def updates_steps(self) -> int:
        """Optimiser steps per update (PPO: fixed; GRPO: an estimate for the schedule)."""
        if self.algo == "ppo":
            return self.ppo.epochs * self.env.num_envs * self.train.steps_per_update // self.ppo.samples_per_step
        return self.grpo.epochs * max(
            1, self.train.prompts_per_update * self.grpo.group_size // self.grpo.samples_per_step
        )


# ----------------------------------------------------------------------------------------------


def make_policy(model, tokenizer, cfg: SamplingSection, *, seed: int, image_processor=None, temperature=None):
    """The sampler as a rollout policy (contexts -> responses with temperature log-probs)."""
    from sftrl_jax.sampling.policy import Policy

    return Policy(
        model,
        tokenizer,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature if temperature is None else temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        seed=seed,
        image_processor=image_processor,
    )


def _response_row(turn, row: np.ndarray) -> np.ndarray:
    """The response tokens' entries of a [L] row aligned with `targets` (position c - 1 predicts the
    first response token)."""
    c = len(turn.context_ids)
    return row[c - 1 : c - 1 + len(turn.response_ids)].astype(np.float32)


def _token_gap(turns, trainer_logps) -> float:
    """max |trainer - sampler| over the response tokens of turns (the sampler's own log-probs)."""
    return max(
        (
            float(np.abs(lp - np.asarray(t.logprobs[: len(lp)], np.float32)).max())
            for t, lp in zip(turns, trainer_logps)
            if len(lp)
        ),
        default=0.0,
    )


def rl_compiler_options(enabled: bool = True) -> dict | None:
    """XLA options of the RL training passes (update step, values / log-prob pass, reference pass)
    on CPU: no YNNPACK fusions. Why: XLA:CPU hands some elementwise and reduction fusions to
    YNNPACK, and which ones depends on the whole program, so the update step (which also takes
    gradients) rounded its first forward differently from the pass that gave the ratio's old
    log-probs: on the 17.9% warm-up model of docs/RESULTS.md one PPO update's first-step
    |ratio - 1| was 4.0e-5 with them and exactly 0 without (XLA's own loops). The products of
    these passes run on OpenBLAS (`cpu_gemm`) either way; XLA's own loops made one PPO update's
    training passes of that run 20-35% slower (6.5-7.6 vs 5.4-5.5 s). None on other backends or
    when not `enabled` (`train.exact_cpu_passes`)."""
    if not enabled or jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


class Trainer:
    """Holds the run's state; `run()` does the updates."""

    def __init__(self, cfg: RLConfig):
        self.cfg = cfg
        t = cfg.train
        distributed.maybe_initialize(auto=t.distributed)
        if jax.process_count() > 1:
            raise UserError(
                "sftrl rl runs in one process for now (rollouts are host-side); use one host with many devices"
            )
        os.makedirs(t.run_dir, exist_ok=True)
        config_lib.dump_yaml(cfg, os.path.join(t.run_dir, "config.yaml"))
        devices = jax.devices() if t.devices is None else jax.devices()[: t.devices]
        self.mesh = mesh_lib.make_mesh(mesh_lib.parse_mesh_spec(t.mesh), devices=devices)
        self.tokenizer = tokenizer_for(cfg.model)
        model = load_model(cfg.model, mesh=self.mesh, seed=t.seed)
        self.image_processor = processor.for_model(model)
        if cfg.env.task.endswith("-vl") and self.image_processor is None:
            raise ConfigError(
                f"env.task {cfg.env.task} has images but the model {type(model).__name__} has no vision tower"
            )
        dim = model.config.text.hidden_size
        head = ValueHead(dim, rngs=nnx.Rngs(t.seed + 1))
        policy = PolicyWithValue(model, head) if cfg.algo == "ppo" else model
        self.graphdef, params, self.rest = nnx.split(policy, nnx.Param, ...)
        params = on_mesh(params, self.mesh)
        # The frozen reference of the KL penalty (`ppo.kl_coef` / `grpo.kl_coef` > 0): the policy the
        # run starts from (model.init), copied before a resume replaces the parameters.
        self.ref_params = jax.tree.map(jnp.copy, params) if cfg.algo_cfg.kl_coef > 0 else None
        self.n_params = param_count(params)
        total = t.updates * cfg.updates_steps()
        self.lr_fn = optim_lib.schedule(cfg.optim, total)
        self.tx = optim_lib.make_optimizer(cfg.optim, params, total_steps=total)
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.tx.init)(params)
        self.state = on_mesh(
            TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=rng_data(t.seed)), self.mesh
        )
        self.compute = ComputeCounter(n_params=self.n_params, d_init=t.d_init)
        self.update_idx = 0
        self._rollout_state: dict[str, Any] | None = None  # restored PPO runner state, applied lazily
        self.checkpointer = ckpt_lib.Checkpointer(
            os.path.join(t.run_dir, "checkpoints"), keep=t.keep, every=t.save_every, async_save=t.async_checkpointing
        )
        if t.resume and self.checkpointer.latest_step() is not None:
            step, self.state, extra = self.checkpointer.restore_latest(abstract_like(self.state))
            self.update_idx = int(step)
            self.compute = ComputeCounter.from_state(extra["compute"])
            self._rollout_state = extra.get("rollout")
            print(f"rl: resumed {t.run_dir} at update {self.update_idx}")
        algo = cfg.algo_cfg
        state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
        make = ppo_lib.make_update_step if cfg.algo == "ppo" else grpo_lib.make_update_step
        # The fp32 products of the training passes on OpenBLAS (one CPU device); the causal attention,
        # RoPE and the q/k/v, gate/up projections stay XLA ops / separate products
        # (`cpu_gemm(causal_kernel=False)`): with the SFT step's kernels and fused products the
        # update step's first log-probs were no longer bitwise those of the passes that gave the
        # ratio's old log-probs (tests/rl/test_rl_train.py's layout tests: ratio 1 +- 2.4e-7). One
        # cause: XLA:CPU contracts mul+add into FMA in some fusions and not others (the fused
        # projections pass those tests under XLA_FLAGS=--xla_cpu_max_isa=AVX). The passes are also
        # compiled without YNNPACK fusions (`rl_compiler_options`).
        gemm = use_cpu_gemm(self.mesh)
        rl_gemm = functools.partial(with_cpu_gemm, enabled=gemm, causal_kernel=False)
        options = rl_compiler_options(cfg.train.exact_cpu_passes)
        self.update_fn = jax.jit(
            rl_gemm(make(self.graphdef, self.rest, self.tx, algo, lr_fn=self.lr_fn)),
            donate_argnums=0,
            out_shardings=(state_shardings, None),
            compiler_options=options,
        )
        if cfg.algo == "ppo":
            fn = ppo_lib.make_value_fn(self.graphdef, self.rest, algo.temperature)
            self.value_fn = jax.jit(rl_gemm(fn), compiler_options=options)
        else:
            fn = grpo_lib.make_logp_fn(self.graphdef, self.rest, algo.temperature)
            self.logp_fn = jax.jit(rl_gemm(fn), compiler_options=options)
        self.envs = [envs.make(cfg.env.task, split=cfg.env.split, **cfg.env.options) for _ in range(cfg.env.num_envs)]
        self.runner = None

    # -- helpers ---------------------------------------------------------------------------------

    def lm(self):
        """The current language model (shares the train state's arrays; no copy)."""
        module = nnx.merge(self.graphdef, self.state.params, self.rest)
        return module.model if isinstance(module, PolicyWithValue) else module

    def policy(self, temperature=None, seed_offset: int = 0):
        return make_policy(
            self.lm(),
            self.tokenizer,
            self.cfg.sampling,
            seed=self.cfg.train.seed * 7919 + self.update_idx * 104729 + seed_offset,
            image_processor=self.image_processor,
            temperature=temperature,
        )

    def episode_seed(self, episode: int) -> int:
        return (self.cfg.train.seed * 1_000_003 + self.update_idx) * 100_003 + episode

    def _device_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return global_batch(
            {k: v for k, v in batch.items() if k in BATCH_KEYS}, self.mesh, pad_id=self.tokenizer.pad_id
        )

    def _build(self, turns):
        return ppo_lib.build_batch(
            turns,
            self.tokenizer,
            self.cfg.ppo,
            buckets=self.cfg.train.length_buckets,
            image_processor=self.image_processor,
        )

    def _count_generation(self, turns):
        for t in turns:
            self.compute.add_generation(len(t.context_ids), len(t.response_ids))

    # -- PPO -------------------------------------------------------------------------------------

    def collect_ppo(self):
        cfg = self.cfg
        if self.runner is None:
            self.runner = rollout.EpisodeRunner(
                self.envs, self.tokenizer, None, reset_fn=lambda i, ep: (self.episode_seed(ep), None)
            )
            if self._rollout_state is not None:
                self.runner.load_state(self._rollout_state)
                self._rollout_state = None
        self.runner.policy = self.policy()
        buffer = rollout.collect(self.runner, cfg.train.steps_per_update)
        flat = [t for row in buffer for t in row]
        self._count_generation(flat)
        return buffer, flat

    def values_of(self, turns, steps=None) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(values, trainer turn log-probs, trainer token log-probs of each response) of turns, in
        micro-batches (laid out as `steps`, see `_rows_of`)."""
        rows = self._rows_of(turns, self.cfg.ppo.micro_batch, lambda b: self.value_fn(self.state.params, b), steps)
        tokens = [_response_row(t, r[2]) for t, r in zip(turns, rows)]
        return np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), tokens

    def _rows_of(self, turns, mb: int, fn, steps=None) -> list[tuple[np.ndarray, ...]]:
        """fn(device micro-batch) -> arrays with a leading row axis; returns each turn's rows.

        `steps` (lists of indices into `turns`, each a multiple of `mb` long) are the optimiser steps
        of the first epoch: each is built as one padded batch and cut into micro-batches exactly as
        the update step does, so this forward sees every turn in the layout (companions, padded
        length, row) of the first step's forward and computes the same bits: the first step's ratio
        is 1 and its reference KL 0, not just 1 and 0 up to fp32 rounding. Turns in no step follow
        in chunks of `mb` (the last one padded with copies of its last turn)."""
        out: list = [None] * len(turns)
        layout = [[int(i) for i in s] for s in steps or []]
        covered = {i for s in layout for i in s}
        rest = [i for i in range(len(turns)) if i not in covered]
        for lo in range(0, len(rest), mb):
            chunk = rest[lo : lo + mb]
            layout.append(chunk + [chunk[-1]] * (mb - len(chunk)))
        for idx in layout:
            batch = self._build([turns[i] for i in idx])
            for lo in range(0, len(idx), mb):
                res = fn(self._device_batch({k: v[lo : lo + mb] for k, v in batch.items() if k in BATCH_KEYS}))
                res = [np.asarray(r) for r in res]
                for r, i in enumerate(idx[lo : lo + mb]):
                    if out[i] is None:
                        out[i] = tuple(x[r] for x in res)
        return out

    def next_values(self) -> np.ndarray:
        """V of each env's next context (bootstrap for GAE); 0 where no episode is in progress."""
        out = np.zeros(len(self.envs), np.float32)
        ctx = self.runner.contexts()
        if not ctx:
            return out
        fake = [
            rollout.Turn(i, -1, 0, c, [], [], "", 0.0, False, False, list(self.runner.images[i]), {}) for i, c in ctx
        ]
        values, _, _ = self.values_of(fake)
        for (i, _), v in zip(ctx, values):
            out[i] = v
        return out

    def update_ppo(self) -> dict[str, float]:
        cfg, pcfg = self.cfg, self.cfg.ppo
        t0 = time.perf_counter()
        buffer, flat = self.collect_ppo()
        t_roll = time.perf_counter() - t0
        T, E = len(buffer), len(buffer[0])
        rewards, dones = rollout.rewards_array(buffer, pcfg.reward_mode)
        rng = np.random.default_rng([cfg.train.seed, self.update_idx])
        orders = [rng.permutation(len(flat)) for _ in range(pcfg.epochs)]
        S = pcfg.samples_per_step
        first_steps = [orders[0][s : s + S] for s in range(0, len(flat), S)]
        values, trainer_logp, trainer_tokens = self.values_of(flat, first_steps)
        last = self.next_values()
        adv, ret = ppo_lib.advantages_for(rewards, values.reshape(T, E), dones, last, pcfg)
        adv, ret = adv.reshape(-1), ret.reshape(-1)
        sampler_logp = np.array([self._sampler_turn_logp(t) for t in flat], np.float32)
        # ppo.old_logp "trainer": the ratio's old token log-probs are the values pass's (else the
        # sampler's, which `_build` puts in old_token_logp)
        old_of = {id(t): lp for t, lp in zip(flat, trainer_tokens)} if pcfg.old_logp == "trainer" else None
        sampler_gap = _token_gap(flat, trainer_tokens)
        ref_of = self._ref_table(flat, first_steps)
        metrics: list[dict] = []
        t1 = time.perf_counter()
        for epoch, order in enumerate(orders):
            for s in range(0, len(order), pcfg.samples_per_step):
                idx = order[s : s + pcfg.samples_per_step]
                batch = self._build([flat[i] for i in idx])
                if old_of is not None:
                    self._put_token_logp(batch, "old_token_logp", [flat[i] for i in idx], old_of)
                batch.update(
                    old_values=values[idx].astype(np.float32),
                    advantages=adv[idx].astype(np.float32),
                    returns=ret[idx].astype(np.float32),
                )
                if ref_of is not None:
                    self._put_token_logp(batch, "ref_token_logp", [flat[i] for i in idx], ref_of)
                self.state, m = self.update_fn(self.state, self._device_batch(batch))
                m = {k: float(v) for k, v in m.items()}
                m["epoch"] = epoch
                metrics.append(m)
                self.compute.add_train(
                    int(batch["attention_mask"].sum()), n_images=sum(len(flat[i].images) for i in idx)
                )
        t_train = time.perf_counter() - t1
        out = _mean_metrics(metrics)
        # Before the first optimiser step: the trainer-sampler gap (token level, the values pass vs
        # the sampler), and the first step's ratio (turn level, against `ppo.old_logp`).
        out["logprob_gap_first_step"] = sampler_gap
        out["ratio_dev_first_step"] = metrics[0]["ratio_dev_max"]
        if ref_of is not None:  # 0 up to rounding while the policy is still the reference
            out["ref_kl_first_step"] = metrics[0]["ref_kl"]
        out["value_explained_variance"] = float(_explained_variance(values, ret))
        out["trainer_sampler_turn_logp_gap"] = float(np.max(np.abs(trainer_logp - sampler_logp)))
        out.update(self._rollout_stats(flat, t_roll, t_train))
        return out

    def _sampler_turn_logp(self, t) -> float:
        start = ppo_lib.action_start(self.tokenizer, t.response_ids, self.cfg.ppo.action_keys)
        lp = np.asarray(t.logprobs, np.float64)
        w = np.where(np.arange(len(lp)) < start, self.cfg.ppo.thought_coef, 1.0)
        return float((lp * w).sum())

    # -- GRPO ------------------------------------------------------------------------------------

    def update_grpo(self) -> dict[str, float]:
        cfg, gcfg = self.cfg, self.cfg.grpo
        G, P = gcfg.group_size, cfg.train.prompts_per_update
        group_seeds = [self.episode_seed(p) for p in range(P)]
        runner = rollout.EpisodeRunner(
            self.envs, self.tokenizer, self.policy(), reset_fn=lambda i, ep: self._group_reset(group_seeds[ep // G])
        )
        t0 = time.perf_counter()
        turns = rollout.run_episodes(runner, P * G)
        t_roll = time.perf_counter() - t0
        self._count_generation(turns)
        table = rollout.episode_table(turns)
        episodes = [table[e] for e in sorted(table)]
        adv = grpo_lib.episode_advantages(episodes, [e // G for e in sorted(table)], gcfg)
        samples = [(t, a) for ep, a in zip(episodes, adv) for t in ep]
        # grpo.old_logp "trainer": the training forward's token log-probs of every turn under the
        # rollout's parameters become the ratio's old log-probs (and give the trainer-sampler gap).
        S = gcfg.samples_per_step
        rng = np.random.default_rng([cfg.train.seed, self.update_idx])
        epoch_steps = [self._grpo_steps(rng.permutation(len(samples)), S) for _ in range(gcfg.epochs)]
        first_steps = epoch_steps[0]
        old_of, sampler_gap = None, None
        if gcfg.old_logp == "trainer":
            trainer_logp = self.token_logps_of([t for t, _ in samples], steps=first_steps)
            old_of = {id(t): lp for (t, _), lp in zip(samples, trainer_logp)}
            sampler_gap = _token_gap([t for t, _ in samples], trainer_logp)
        ref_of = self._ref_table([t for t, _ in samples], first_steps)
        metrics = []
        t1 = time.perf_counter()
        for epoch, steps in enumerate(epoch_steps):
            for idx in steps:
                chosen = [samples[i] for i in idx]
                real = len(set(idx))  # fewer turns than one step: the step repeats them, with zero advantage
                adv_step = [a if k < real else 0.0 for k, (_, a) in enumerate(chosen)]
                batch = self._build([t for t, _ in chosen])
                batch["advantages"] = np.array(adv_step, np.float32)
                if old_of is not None:
                    self._put_token_logp(batch, "old_token_logp", [t for t, _ in chosen], old_of)
                if ref_of is not None:
                    self._put_token_logp(batch, "ref_token_logp", [t for t, _ in chosen], ref_of)
                self.state, m = self.update_fn(self.state, self._device_batch(batch))
                m = {k: float(v) for k, v in m.items()}
                m["epoch"] = epoch
                metrics.append(m)
                self.compute.add_train(int(batch["attention_mask"].sum()))
        t_train = time.perf_counter() - t1
        out = _mean_metrics(metrics)
        # trainer vs sampler, token level, before any step; and the first step's max |log ratio|
        first = metrics[0]["logprob_gap_max"]  # |first step's log-probs - old log-probs|, token level
        out["logprob_gap_first_step"] = first if sampler_gap is None else sampler_gap
        out["log_ratio_dev_first_step"] = first
        if ref_of is not None:  # 0 up to rounding while the policy is still the reference
            out["ref_kl_first_step"] = metrics[0]["ref_kl"]
        out.update(self._rollout_stats(turns, t_roll, t_train))
        return out

    def token_logps_of(self, turns, params=None, steps=None) -> list[np.ndarray]:
        """The training forward's token log-probs of each turn's response under `params` (default: the
        current ones; `self.ref_params` for the KL reference), in micro-batches (laid out as `steps`,
        see `_rows_of`)."""
        params = self.state.params if params is None else params
        if self.cfg.algo == "ppo":
            fn = lambda b: self.value_fn(params, b)[2:]  # noqa: E731
        else:
            fn = lambda b: (self.logp_fn(params, b),)  # noqa: E731
        rows = self._rows_of(turns, self.cfg.algo_cfg.micro_batch, fn, steps)
        return [_response_row(t, logp) for t, (logp,) in zip(turns, rows)]

    def _ref_table(self, turns, steps=None) -> dict[int, np.ndarray] | None:
        """id(turn) -> the reference policy's token log-probs (None without a KL penalty)."""
        if self.ref_params is None:
            return None
        return {id(t): lp for t, lp in zip(turns, self.token_logps_of(turns, self.ref_params, steps))}

    @staticmethod
    def _grpo_steps(order: np.ndarray, S: int) -> list[list[int]]:
        """One epoch's optimiser steps over the shuffled `order`: chunks of S; a partial last chunk is
        dropped (its turns are in the next shuffle's steps), unless it is the only one: then it is
        repeated up to S (the repeats get zero advantage)."""
        order = [int(i) for i in order]
        steps = [order[s : s + S] for s in range(0, len(order), S)]
        if len(steps) > 1 and len(steps[-1]) < S:
            steps.pop()
        return [(idx * (S // len(idx) + 1))[:S] for idx in steps]

    @staticmethod
    def _put_token_logp(batch, key: str, turns, table: dict[int, np.ndarray]) -> None:
        """batch[key] [B, L]: each turn's response token log-probs from `table`, aligned with targets."""
        out = np.zeros_like(batch["old_token_logp"])
        for b, t in enumerate(turns):
            c = len(t.context_ids)
            out[b, c - 1 : c - 1 + len(t.response_ids)] = table[id(t)]
        batch[key] = out

    def _group_reset(self, seed: int):
        if self.cfg.env.task.startswith("virl"):
            n = self.envs[0].n_routes
            return seed, {"route_idx": seed % n}
        return seed, None

    # -- shared ----------------------------------------------------------------------------------

    def _rollout_stats(self, turns, t_roll: float, t_train: float) -> dict[str, float]:
        rewards = [t.reward for t in turns]
        done = [t for t in turns if t.done]
        gen_tokens = sum(len(t.response_ids) for t in turns)
        out = {
            "turns": len(turns),
            "episodes_finished": len(done),
            "success_rate": (sum(1 for t in done if t.solved) / len(done)) if done else float("nan"),
            "reward_mean": float(np.mean(rewards)),
            "response_tokens_mean": gen_tokens / max(len(turns), 1),
            "rollout_tokens_per_s": gen_tokens / max(t_roll, 1e-9),
            "rollout_seconds": t_roll,
            "train_seconds": t_train,
            "gflops": self.compute.flops(rl=True) / 1e9,
            "gflops_paper_lambda": (
                6 * self.n_params * (self.compute.d_init + self.compute.trained_tokens)
                + 2 * self.n_params * LAMBDA[self.cfg.env.task.split("-")[0]] * self.compute.trained_tokens
            )
            / 1e9,
        }
        for name in (
            "CORRECT",
            "PARTIAL",
            "NO_SOLUTION",
            "INCORRECT_VISION",
            "INCORRECT_NUMBER",
            "ILLEGAL_FORMULA",
            "AGGREGATED_ERROR",
            "STEP_LIMIT",
        ):
            n = sum(1 for t in turns if t.info.get("outcome") == name)
            if n:
                out[f"outcome/{name}"] = n
        graded = [t for t in turns if "repeated" in t.info and t.info.get("outcome") not in (None, "STEP_LIMIT")]
        if graded:  # GP: graded answers that repeat an earlier formula of their episode
            out["repeated_answers"] = sum(1 for t in graded if t.info["repeated"]) / len(graded)
        return out

    def evaluate(self, writer) -> list[dict]:
        e = self.cfg.eval
        rows = []
        policy = make_policy(
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
                progress=self.cfg.train.progress,
                out_dir=os.path.join(self.cfg.train.run_dir, "eval", f"update{self.update_idx}", split),
                env_options=eval_env_options(self.cfg.env.options),
            )
            row = report_lib.append_eval(
                self.cfg.train.run_dir,
                arm="rl" if self.update_idx else "init",
                step=self.update_idx,
                gflops=self.compute.flops(rl=True) / 1e9,
                summary=summary,
            )
            writer.write(self.update_idx, {f"{split}/{row['metric']}": row["value"]}, prefix="eval")
            rows.append(row)
        return rows

    def save(self) -> None:
        extra = {"compute": self.compute.state()}
        if self.runner is not None:
            extra["rollout"] = self.runner.state()
        elif self._rollout_state is not None:  # resumed but not stepped yet: keep what was restored
            extra["rollout"] = self._rollout_state
        if self.checkpointer.latest_step() != self.update_idx:
            self.checkpointer.save(self.update_idx, self.state, extra)

    def run(self, *, stop_after: int | None = None) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        writer = metrics_lib.MetricsWriter(t.run_dir, tensorboard=t.tensorboard)
        last: dict[str, Any] = {}
        bad = 0
        bar = None
        if t.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=t.updates, initial=self.update_idx, desc=f"rl {cfg.algo}", unit="update", dynamic_ncols=True
            )
        done_now = 0
        try:
            with ckpt_lib.PreemptionGuard() as guard, jax.set_mesh(self.mesh):
                if self.update_idx == 0 and cfg.eval.every:
                    self.evaluate(writer)
                while self.update_idx < t.updates:
                    m = self.update_ppo() if cfg.algo == "ppo" else self.update_grpo()
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
                    if self.update_idx % t.save_every == 0:
                        self.save()
                    if guard.requested:
                        self.save()
                        print(f"rl: SIGTERM received; saved update {self.update_idx}; exiting")
                        return last
                    if stop_after is not None and done_now >= stop_after:
                        return last
                self.save()
                if cfg.eval.every or cfg.eval.splits:
                    self.evaluate(writer)
                self.save_final()
        finally:
            self.checkpointer.close()
            writer.close()
            if bar is not None:
                bar.close()
        return last

    def save_final(self) -> str:
        from sftrl_jax.models.checkpoint import save_checkpoint

        path = os.path.join(self.cfg.train.run_dir, "final")
        save_checkpoint(self.lm(), path)
        return path


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    keys = rows[0].keys() if rows else ()
    return {
        k: float(np.max([r[k] for r in rows]) if k.endswith("_max") else np.mean([r[k] for r in rows])) for k in keys
    }


def _explained_variance(values, returns) -> float:
    var = np.var(returns)
    return float(1 - np.var(returns - values) / var) if var > 0 else float("nan")


def train(cfg: RLConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    return Trainer(cfg).run(stop_after=stop_after)

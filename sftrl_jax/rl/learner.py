"""The interface of an RL algorithm's learner, and what every learner shares.

A learner (`ppo.PPOLearner`, `grpo.GRPOLearner`) is the RL job's algorithm. It receives the run
harness (`train.run.Run`: mesh, tokenizer, parameters, optimiser, the ops policy its programs are
compiled under) and owns its algorithm's part: the module it trains (with or without a value
head), its jitted programs (`programs`: the update step and the no-gradient pass, the same ones
`sftrl plan` compiles), the environments and the rollouts' policy, how it collects turns and how
it turns them into optimiser steps. `rl.train.Trainer` (the RL job) calls `update()` once per
update. Shared here: the environments, batcher and reward scorer, the rollouts' policy and the
episode seeds, the steps over built batches, the old / reference token log-prob tables in the first
step's layout, and the per-update statistics (the env package's own via `envs.rl_hooks`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from sftrl_jax import envs
from sftrl_jax.config import ConfigError, check_ranges
from sftrl_jax.envs import device_scoring
from sftrl_jax.episodes import Turn
from sftrl_jax.evaluation import compute as compute_lib
from sftrl_jax.rl import batching
from sftrl_jax.sampling import policy as policy_lib
from sftrl_jax.train import accumulate as accum_lib


@dataclasses.dataclass(frozen=True)
class AlgoConfig:
    """What every algorithm's config section has (`ppo:`, `grpo:`); `NAME` is the section's name."""

    NAME: ClassVar[str] = ""
    # Keys that moved out of the section (`config.from_dict` names the new one): log-probs are scored
    # at the run's one temperature, the sampler's.
    MOVED_KEYS: ClassVar[dict[str, str]] = {"temperature": "sampling.temperature"}
    kl_coef: float = 0.0  # beta; > 0: + beta KL(pi || pi_ref), pi_ref the starting policy (model.init), frozen
    epochs: int = 1  # passes over the update's turns
    samples_per_step: int = 64  # turns per optimiser step
    micro_batch: int = 8  # turns per forward/backward inside a step
    # Where the ratio's old token log-probs come from: "trainer" = the training forward over the
    # rollout's turns, each in the first optimiser step's batch layout (the first step's ratio is then
    # exactly 1 in the tests' settings; on trained models XLA may round the update's own forward
    # differently, ~4e-5); "sampler" = the sampler's log-probs; "auto" = "trainer" where the two
    # differ by design (a compute dtype below fp32, or `tis_cap` on), else "sampler" (`old_logp_source`).
    # Either way the trainer's pass runs: it measures the sampler's agreement every update.
    old_logp: str = "sampler"
    # Truncated importance sampling (TIS): C > 0 multiplies the policy-gradient term by
    # min(pi_old_trainer / pi_sampler, C), the correction for sampling from the sampler's slightly
    # different distribution (verl's tis_imp_ratio_cap; 2 is usual). 0 = off. Needs the trainer's old log-probs.
    tis_cap: float = 0.0

    def __post_init__(self):
        n = self.NAME
        check_ranges(
            self,
            kl_coef="[0, inf)",
            epochs="[1, inf)",
            samples_per_step="[1, inf)",
            micro_batch="[1, inf)",
            tis_cap="[0, inf)",
        )
        if self.samples_per_step % self.micro_batch:
            raise ConfigError(
                f"{n}.samples_per_step ({self.samples_per_step}) must be a multiple of {n}.micro_batch ({self.micro_batch})"
            )
        self.choice("old_logp", ("trainer", "sampler", "auto"))
        if 0 < self.tis_cap < 1:  # a cap below 1 would scale down even the tokens the two agree on
            raise ConfigError(f"{n}.tis_cap must be 0 (off) or at least 1, got {self.tis_cap}")
        if self.tis_cap > 0 and self.old_logp == "sampler":
            raise ConfigError(
                f"{n}.tis_cap needs the trainer's old log-probs ({n}.old_logp trainer or auto): against the "
                f"sampler's, the ratio already carries the sampler/trainer mismatch"
            )

    def old_logp_source(self, model) -> str:
        """Where the old log-probs come from, "trainer" or "sampler": `old_logp` with "auto" resolved
        for `model` (the run's `ModelSection`)."""
        if self.old_logp != "auto":
            return self.old_logp
        low_precision = (model.dtype or model.param_dtype) != "float32"
        return "trainer" if low_precision or self.tis_cap > 0 else "sampler"

    def choice(self, key: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, key)
        if value not in allowed:
            names = " or ".join(repr(a) for a in allowed)
            raise ConfigError(f"{self.NAME}.{key} must be {names}, got {value!r}")

    def check_run(self, run_cfg) -> None:
        """The run's other sections against this one (`rl.config.RLConfig`)."""

    def steps_per_update(self, run_cfg) -> int:
        """Optimiser steps per update (for the learning-rate schedule)."""
        raise NotImplementedError


class Learner:
    """One algorithm's update over the harness's state (`run`: the `train.run.Run`; `rl_cfg`: the
    `rl.config.RLConfig`; `compute`: the run's `ComputeCounter`)."""

    name: str = ""  # the algorithm's name: `algo` in the config, and its config section
    nograd_name: str = ""  # its no-gradient program's name (`programs`)

    def __init__(self, run, rl_cfg, compute: compute_lib.ComputeCounter):
        self.run, self.rl_cfg, self.compute = run, rl_cfg, compute
        self.cfg = getattr(rl_cfg, self.name)
        self.hooks = envs.rl_hooks(rl_cfg.env.task)
        self.batcher = batching.Batcher(
            run.tokenizer,
            run.mesh,
            rl_cfg.ppo,
            buckets=rl_cfg.train.length_buckets,
            image_processor=run.image_processor,
        )
        env = rl_cfg.env
        self.envs = [envs.make(env.task, split=env.split, **env.options) for _ in range(env.num_envs)]
        # env.reward_on_device: the rollouts' rewards from one compiled program after sampling (or None)
        self.reward_scorer = device_scoring.make_scorer(
            env.reward_on_device, env.task, env.options, run.tokenizer, width=rl_cfg.sampling.max_new_tokens
        )
        # The frozen reference of the KL penalty (kl_coef > 0): the policy the run started from.
        self.ref_params = run.reference_params
        programs = self.programs(run, rl_cfg)
        self.update_fn, self.nograd_fn = programs["update"], programs[self.nograd_name]

    # -- the interface ---------------------------------------------------------------------------

    @staticmethod
    def policy_module(model, *, seed: int):
        """The module whose parameters the run trains (the language model, or it with a head)."""
        return model

    @staticmethod
    def language_model(module):
        """The language model inside `policy_module`'s module (for sampling and the final save)."""
        return module

    # make_update_step(graphdef, rest, tx, cfg, *, lr_fn, temperature) -> the pure optimiser step;
    # make_nograd_fn(graphdef, rest, temperature) -> the pure no-gradient pass (each learner's own)
    make_update_step: Any = None
    make_nograd_fn: Any = None

    @classmethod
    def programs(cls, run, rl_cfg) -> dict[str, Any]:
        """The learner's jitted programs over `run` (`train.run.Run`, or `train.run.AbstractRun`
        for `sftrl plan`): "update" (the optimiser step, state donated) and `nograd_name`."""
        t, cfg = rl_cfg.sampling.temperature, getattr(rl_cfg, cls.name)
        step = cls.make_update_step(run.graphdef, run.rest, run.tx, cfg, lr_fn=run.lr_fn, temperature=t)
        return {
            "update": run.compile(step, donate_argnums=0, out_shardings=(run.state_shardings, None)),
            cls.nograd_name: run.compile(cls.make_nograd_fn(run.graphdef, run.rest, t)),
        }

    @classmethod
    def update_arrays(cls, cfg, rows: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{name: (shape, dtype)} of the update batch's arrays beyond `batching.batch_spec`'s."""
        raise NotImplementedError

    @classmethod
    def rollout_rows(cls, rl_cfg) -> int:
        """The rows of one sampling call of the rollouts (one per env)."""
        return rl_cfg.env.num_envs

    def update(self) -> dict[str, float]:
        """One update: collect turns with the current policy, then optimiser steps."""
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

    @property
    def update_idx(self) -> int:
        """Updates done (the harness's step)."""
        return self.run.step

    def lm(self):
        """The current language model (shares the train state's arrays; no copy)."""
        return self.language_model(self.run.module())

    def policy(self, temperature=None, seed_offset: int = 0):
        """The sampler at the current parameters: the rollouts' policy (seeded per update)."""
        return policy_lib.make_policy(
            self.lm(),
            self.run.tokenizer,
            self.rl_cfg.sampling,
            seed=self.rl_cfg.train.seed * 7919 + self.update_idx * 104729 + seed_offset,
            image_processor=self.run.image_processor,
            temperature=temperature,
        )

    def episode_seed(self, episode: int) -> int:
        return (self.rl_cfg.train.seed * 1_000_003 + self.update_idx) * 100_003 + episode

    def update_step(self, batch) -> dict[str, jax.Array]:
        """One optimiser step on the device batch; the harness's state advances."""
        self.run.state, m = self.update_fn(self.run.state, batch)
        return m

    def token_logps_of(self, turns: Sequence[Turn], params=None, steps=None) -> list[np.ndarray]:
        """The training forward's token log-probs of each turn's response under `params` (default: the
        current ones; `ref_params` for the KL reference), in micro-batches laid out as `steps`
        (`batching.Batcher.rows_of`)."""
        params = self.run.state.params if params is None else params
        rows = self.batcher.rows_of(turns, self.cfg.micro_batch, lambda b: self.no_grad_logp(params, b), steps)
        return [batching.response_row(t, logp) for t, (logp,) in zip(turns, rows)]

    def ref_table(self, turns: Sequence[Turn], steps=None) -> dict[int, np.ndarray] | None:
        """id(turn) -> the reference policy's token log-probs (None without a KL penalty)."""
        if self.ref_params is None:
            return None
        return {id(t): lp for t, lp in zip(turns, self.token_logps_of(turns, self.ref_params, steps))}

    def old_and_ref(self, turns: Sequence[Turn], trainer_logp: list[np.ndarray], first_steps):
        """(old_of, ref_of, agreement) for `train_steps` from the trainer's token log-probs of `turns`:
        the ratio's old log-probs where `old_logp` is "trainer" (else None: the sampler's), the
        reference's (None without a KL penalty), and the trainer-sampler agreement metrics."""
        trainer_old = self.cfg.old_logp_source(self.rl_cfg.model) == "trainer"
        old_of = {id(t): lp for t, lp in zip(turns, trainer_logp)} if trainer_old else None
        agreement = {
            "logprob_gap_first_step": batching.token_gap(turns, trainer_logp),
            **batching.sampler_agreement(turns, trainer_logp),
        }
        return old_of, self.ref_table(turns, first_steps), agreement

    def steps_and_metrics(self, steps, old_of, ref_of, agreement: dict) -> tuple[list[dict], dict, float]:
        """`train_steps` over `steps`: (each step's metrics, the update's row: their means, the
        trainer-sampler `agreement` before any step, the first step's KL to the reference, the
        seconds it took)."""
        t1 = time.perf_counter()
        metrics = self.train_steps(steps, old_of=old_of, ref_of=ref_of)
        t_train = time.perf_counter() - t1
        out = {**mean_metrics(metrics), **agreement}
        if ref_of is not None:  # 0 up to rounding while the policy is still the reference
            out["ref_kl_first_step"] = metrics[0]["ref_kl"]
        return metrics, out, t_train

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
        metrics = []
        for epoch, turns, extra in steps:
            batch = self.batcher.build(turns)
            batch.update(extra)
            if self.rl_cfg.algo_cfg.tis_cap > 0:  # TIS: the sampler's log-probs (as built) beside the old ones
                batch["sampler_token_logp"] = batch["old_token_logp"].copy()
            if old_of is not None:
                batching.put_token_logp(batch, "old_token_logp", turns, old_of)
            if ref_of is not None:
                batching.put_token_logp(batch, "ref_token_logp", turns, ref_of)
            m = {k: float(v) for k, v in self.update_step(self.batcher.device(batch)).items()}
            m["epoch"] = epoch
            metrics.append(m)
            self.compute.add_train(int(batch["attention_mask"].sum()), n_images=sum(len(t.images) for t in turns))
        return metrics

    def count_generation(self, turns: Sequence[Turn]) -> None:
        for t in turns:
            self.compute.add_generation(len(t.context_ids), len(t.response_ids))

    def rollout_stats(self, turns: Sequence[Turn], t_roll: float, t_train: float) -> dict[str, float]:
        """The update's rollout statistics: the loop's own, then the env package's (`turn_stats`)."""
        rewards = [t.reward for t in turns]
        done = [t for t in turns if t.done]
        gen_tokens = sum(len(t.response_ids) for t in turns)
        n, c = self.run.n_params, self.compute
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
                + 2 * n * compute_lib.lambda_for(self.rl_cfg.env.task) * c.trained_tokens
            )
            / 1e9,
        }
        sources = [t.info["reward_source"] for t in turns if "reward_source" in t.info]
        if sources:  # env.reward_on_device: the share scored on the device, host rewards that differed
            out["reward_device_share"] = sources.count("device") / len(sources)
            out["reward_device_mismatch"] = sum(bool(t.info.get("reward_device_mismatch")) for t in turns)
        out.update(self.hooks.turn_stats(turns))
        return out


def make_update(loss_fn, tx, cfg, *, lr_fn, name: str):
    """The pure optimiser step of an algorithm over (TrainState, batch): `loss_fn(params, micro_batch)
    -> (loss, aux)` over `cfg.samples_per_step // cfg.micro_batch` scanned micro-batches, gradients
    averaged, one optimiser update; `cfg.kl_coef` > 0 needs `ref_token_logp` in the batch."""
    n_micro = cfg.samples_per_step // cfg.micro_batch

    def update(state, batch):
        if cfg.kl_coef > 0 and "ref_token_logp" not in batch:
            raise ValueError(
                f"{name}.kl_coef = {cfg.kl_coef} needs the reference's token log-probs in the batch (ref_token_logp)"
            )
        key = accum_lib.step_key(state)  # LoRA dropout (none at dropout 0)
        grads, aux = accum_lib.accumulate(loss_fn, state.params, batch, n_micro=n_micro, key=key)
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        state, update_metrics = accum_lib.apply(state, grads, tx, lr_fn=lr_fn)
        return state, {**accum_lib.reduce_aux(aux), **update_metrics}

    return update


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """The update's metrics from its steps': the max of `*_max` keys, the mean of the others."""
    keys = rows[0].keys() if rows else ()
    return {
        k: float(np.max([r[k] for r in rows]) if k.endswith("_max") else np.mean([r[k] for r in rows])) for k in keys
    }

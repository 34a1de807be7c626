"""The sections of an RL run's YAML file (`sftrl rl --config configs/rl/*.yaml`).

One temperature: `sampling.temperature` is what the sampler draws at and what the PPO / GRPO losses
score log-probs at (logits / temperature), so the first update's ratio starts at 1; the old
`ppo.temperature` / `grpo.temperature` keys are refused with a message naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from sftrl_jax.config import ConfigError, check_ranges
from sftrl_jax.errors import UserError
from sftrl_jax.models.lora import LoRASection
from sftrl_jax.rl import grpo as grpo_lib
from sftrl_jax.rl import ppo as ppo_lib
from sftrl_jax.sampling.policy import SamplingSection
from sftrl_jax.train import optim as optim_lib
from sftrl_jax.train.run import RunSection
from sftrl_jax.train.state import ModelSection

__all__ = [
    "ALGORITHMS",
    "EVAL_ENV_KEYS",
    "EnvSection",
    "EvalSection",
    "RLConfig",
    "RLTrainSection",
    "SamplingSection",
    "eval_env_options",
]


# The algorithm registry: `algo: NAME` picks its config class (the config section of the same name)
# and its learner. No other place branches on the algorithm.
ALGORITHMS = {
    "ppo": (ppo_lib.PPOConfig, ppo_lib.PPOLearner),
    "grpo": (grpo_lib.GRPOConfig, grpo_lib.GRPOLearner),
}


@dataclasses.dataclass(frozen=True)
class EnvSection:
    task: Literal["gp-l", "gp-vl", "virl-l", "virl-vl"] = "gp-l"
    split: Literal["train", "id", "ood-rule", "ood-visual"] = "train"
    num_envs: int = 8  # environments stepped in lock-step (one batched sampling call per turn)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # env options, e.g. verify_iter
    # Rollout rewards also scored on the device right after sampling (`envs.device_scoring`), as a
    # differential check of the host verifier: the host's env.step runs every turn regardless and its
    # reward is the one trained on, so the device score only adds work (+0.9% of a GRPO update here)
    # and is off by default. true = on (refused with exact=false, reference_card_parsing=true,
    # repeat_penalty != 0); null = auto: on where the options allow it. docs/DEVICE_REWARD.md
    reward_on_device: bool | None = False

    def __post_init__(self):
        from sftrl_jax import envs
        from sftrl_jax.envs import device_scoring

        check_ranges(self, num_envs="[1, 65536]")
        # The options are the env's to check: build one now, so a bad option (verify_iter=0) is
        # refused at config time, before a model is loaded (a few ms; V-IRL's first city ~0.4 s).
        try:
            envs.make(self.task, split=self.split, **self.options)
        except envs.EnvError as e:
            raise ConfigError(f"env.options ({self.task}, split {self.split}): {e}") from None
        device_scoring.resolve(self.reward_on_device, self.task, self.options)


# Env options that say how the model is prompted and graded (not what a split's rules are): the
# in-run evaluation uses them too, so a policy trained on another prompt wording is evaluated on it.
# Rule options (face_cards_as_10, target, verify_iter, ...) stay the evaluation split's own.
EVAL_ENV_KEYS = ("template", "data_dir", "exact", "reference_card_parsing", "fix_turn_wrap", "fix_intersection_check")


def eval_env_options(options: dict[str, Any]) -> dict[str, Any]:
    """The part of the training env's `options` that evaluation keeps (see `EVAL_ENV_KEYS`)."""
    return {k: v for k, v in options.items() if k in EVAL_ENV_KEYS}


@dataclasses.dataclass(frozen=True)
class EvalSection:
    every: int = 0  # updates between evaluations (0 = only at the end)
    splits: tuple[str, ...] = ("id", "ood-rule")
    episodes: int | None = None  # None = the paper's protocol size
    temperature: float = 0.0  # greedy evaluation (not the training temperature)
    batch_size: int = 16

    def __post_init__(self):
        check_ranges(self, every="[0, inf)", episodes="[1, inf)", temperature="[0, inf)", batch_size="[1, inf)")


@dataclasses.dataclass(frozen=True)
class RLTrainSection(RunSection):
    """`train:` of an RL run: the harness's keys (`train.run.RunSection`) and the loop's."""

    run_dir: str = "runs/rl"
    save_every: int = 1  # updates
    updates: int = 20  # paper: num_updates (20 GP, 15 V-IRL)
    steps_per_update: int = 256  # PPO: lock-step turns per env per update (paper: num_steps 256)
    prompts_per_update: int = 8  # GRPO: groups per update
    length_buckets: tuple[int, ...] = (256, 512, 1024, 2048)  # padded lengths of training samples
    max_bad_updates: int = 3
    # CPU: the training passes compiled without YNNPACK fusions, so the first update's ratio is
    # exactly 1 (`ops.exact_compiler_options`); false: ~20-35% faster passes at the tiny configs' sizes.
    exact_cpu_passes: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_ranges(
            self,
            updates="[0, inf)",  # 0: no update (the final evaluation of model.init only)
            steps_per_update="[1, inf)",
            prompts_per_update="[1, inf)",
            length_buckets="[1, 1048576]",  # 2**20 tokens: far past any context we train
            max_bad_updates="[1, inf)",
        )
        if list(self.length_buckets) != sorted(set(self.length_buckets)) or not self.length_buckets:
            raise ConfigError(f"train.length_buckets must be increasing lengths, got {list(self.length_buckets)}")


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
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)  # rank 0: full fine-tuning

    def __post_init__(self):
        self.algo_cfg.check_run(self)
        if self.sampling.temperature <= 0:
            raise ConfigError("sampling.temperature must be positive during RL (log-probs use logits / temperature)")
        from sftrl_jax.evaluation import evaluate as eval_lib

        for split in self.eval.splits:  # checked now, not after the first update's evaluation
            try:
                eval_lib.protocol(self.env.task, split)
            except UserError as e:
                raise ConfigError(f"eval.splits: {split!r}: {e}") from None

    @property
    def algo_cfg(self):
        """The algorithm's config section (`ppo:` or `grpo:`)."""
        return getattr(self, self.algo)

    @property
    def learner_class(self):
        return ALGORITHMS[self.algo][1]

    def updates_steps(self) -> int:
        """Optimiser steps per update (PPO: fixed; GRPO: an estimate for the schedule)."""
        return self.algo_cfg.steps_per_update(self)


def check_mesh(cfg: RLConfig, mesh) -> None:
    """The training passes' micro-batches must divide over the mesh's batch axes (data x fsdp): a
    micro-batch of 4 turns on fsdp=8 cannot be sharded, so every device would compute every row
    (8x the FLOPs; the sharding rules silently replicate a dimension they cannot split)."""
    from sftrl_jax.parallel import rules

    with rules.using("train"):  # the training passes' layout, whatever the caller traces under
        ways = rules.batch_ways(mesh)
    name = cfg.algo
    mb = cfg.algo_cfg.micro_batch
    if mb % ways:
        raise ConfigError(
            f"{name}.micro_batch {mb} must be a multiple of the mesh's batch axes data x fsdp ({ways}): "
            f"otherwise its rows are not sharded and every device computes all of them; raise "
            f"{name}.micro_batch (e.g. {ways * -(-mb // ways)}) or shard over tensor instead"
        )

"""`sftrl rl`: reinforcement learning (PPO with a value head, or GRPO) from a YAML config."""

from __future__ import annotations

from sftrl_jax.commands import config_arguments, train_from_config

HELP = "reinforcement learning (PPO, GRPO) from a YAML config"
EXAMPLES = """examples:
  sftrl rl --config configs/rl/gp_l_tiny.yaml model.init=runs/sft/gp_l_tiny/final
  sftrl rl --config configs/rl/gp_l.yaml model.init=/ckpts/GP-L-Init train.updates=20
  sftrl rl --config configs/rl/gp_l_tiny.yaml algo=grpo grpo.group_size=4

Rollouts are multi-turn with verifier feedback; metrics go to <run_dir>/metrics.jsonl, evaluations
to <run_dir>/evals.jsonl (for `sftrl report`), the trained model to <run_dir>/final. A run resumes
from its latest checkpoint; SIGTERM saves and exits 0.
"""


def add_arguments(parser):
    config_arguments(parser, configs="configs/rl/*.yaml")


def run(args) -> int:
    from sftrl_jax.rl.config import RLConfig
    from sftrl_jax.rl.train import train

    return train_from_config(RLConfig, train, args)

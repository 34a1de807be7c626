"""`sftrl rl`: reinforcement learning (PPO with a value head, or GRPO) from a YAML config."""

from __future__ import annotations

import json

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
    parser.add_argument("--config", required=True, help="YAML experiment file (configs/rl/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (YAML values)")


def run(args) -> int:
    from sftrl_jax import config
    from sftrl_jax.rl.config import RLConfig
    from sftrl_jax.rl.train import train

    cfg = config.load(RLConfig, args.config, args.overrides)
    last = train(cfg)
    print(json.dumps({k: v for k, v in last.items() if not isinstance(v, list)}, default=str))
    return 0

"""`sftrl demo`: the whole study in miniature on a CPU (see sftrl_jax/demo.py)."""

from __future__ import annotations

HELP = "the end-to-end CPU demo: SFT warm-up, then SFT vs RL arms, evaluated ID and OOD"
EXAMPLES = """examples:
  sftrl demo
  sftrl demo --config configs/demo/cpu.yaml rl.updates=8 eval_episodes=128

Generates GP-L data, SFT-warms a tiny Llama from scratch (the Init), trains an RL arm (PPO) and an
SFT arm with equal compute from it, evaluates Init/SFT/RL on ID and rule-OOD, prints the table and
writes <run_dir>/report/{report.md,curves.png}. About 10 minutes on 2 CPU cores.
"""


def add_arguments(parser):
    parser.add_argument("--config", default=None, help="YAML (default: configs/demo/cpu.yaml values built in)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def run(args) -> int:
    from sftrl_jax import config, demo

    cfg = config.load(demo.DemoConfig, args.config, args.overrides)
    demo.run(cfg)
    return 0

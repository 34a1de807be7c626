"""`sftrl demo`: `sftrl study` on configs/demo/cpu.yaml, then the Init / RL / SFT table (sftrl_jax/study.py)."""

from __future__ import annotations

import os

from sftrl_jax.commands import study as study_command

HELP = "the end-to-end CPU demo: SFT warm-up, then SFT vs RL arms, evaluated ID and OOD"
EXAMPLES = """examples:
  sftrl demo
  sftrl demo arms.updates=8 eval_episodes=128 run_dir=runs/demo8
  sftrl demo --config configs/study/gp_l_small.yaml seeds=[0]      # any study config

The study's code on configs/demo/cpu.yaml (the same run as `sftrl study --config configs/demo/cpu.yaml`;
overrides use the study's keys): from the shipped pretrained base, GP-L expert data, an SFT warm-up
(Init), a PPO arm and an SFT arm with equal compute, Init/RL/SFT evaluated on ID and rule-OOD; prints
the table and writes <run_dir>/report/{report.md,curves.png,kl.png}. Under 10 minutes on 2 CPU cores.
"""

# In the checkout the package is installed from (`make demo`, `pip install -e .`).
CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "configs", "demo", "cpu.yaml")


def add_arguments(parser):
    study_command.add_arguments(parser, config=os.path.normpath(CONFIG))


def run(args) -> int:
    from sftrl_jax import config, study

    cfg = config.load(study.StudyConfig, args.config, args.overrides)
    out = study.run(cfg)
    print("\n" + study.final_tables(cfg))
    print(f"demo finished in {out['minutes']} min, peak memory {out['peak_rss_mb']} MB; report: {out.get('markdown')}")
    return 0

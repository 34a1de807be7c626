"""`sftrl study`: the small-scale study (see sftrl_jax/study.py)."""

from __future__ import annotations

HELP = "the small-scale study: pretrained base, warm-up, PPO / GRPO / SFT arms, evaluations, KL"
EXAMPLES = """examples:
  sftrl study --config configs/study/gp_l_small.yaml
  sftrl study --config configs/study/gp_l_small.yaml base=null      # pretrain the base here first
  sftrl study --config configs/study/gp_l_small.yaml seeds=[0] eval_episodes=64 run_dir=runs/study/try
  sftrl study --config configs/demo/cpu.yaml                         # the CPU demo (= sftrl demo)
  sftrl report runs/study/gp_l_small                                  # report.md, curves.png, kl.png

From the shipped base (or one pretrained here): per seed an SFT warm-up (Init), then PPO, GRPO and SFT
arms with equal compute, each evaluated on ID and rule-OOD at several compute points (234 hands, 5
tries with feedback) with its KL to Init. Running the command again resumes: finished stages are kept.
"""


def add_arguments(parser, *, config: str | None = None):
    """`--config` (default `config`; None: StudyConfig's defaults, configs/study/gp_l_small.yaml's values)."""
    parser.add_argument("--config", default=config, help=f"a study config YAML ({config or 'built-in defaults'})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def run(args) -> int:
    from sftrl_jax import config, study

    study.run(config.load(study.StudyConfig, args.config, args.overrides))
    return 0

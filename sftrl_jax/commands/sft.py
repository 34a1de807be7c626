"""`sftrl sft`: supervised fine-tuning from a YAML config with key=value overrides."""

from __future__ import annotations

import json

HELP = "supervised fine-tuning from a YAML config"
EXAMPLES = """examples:
  sftrl data gp --variant gp-l --split train --n 4000 --out data/gp_l_train.json
  sftrl sft --config configs/sft/gp_l_tiny.yaml
  sftrl sft --config configs/sft/gp_l_tiny.yaml train.steps=20 optim.lr=3e-4 train.run_dir=runs/try

A run resumes from the latest checkpoint in train.run_dir (train.resume=false starts over in a new
folder). SIGTERM saves a checkpoint and exits 0. Metrics: <run_dir>/metrics.jsonl; the trained
model: <run_dir>/final (load it with `sftrl eval --ckpt`, `sftrl rl`, `sftrl export`).
"""


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="YAML experiment file (configs/sft/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (YAML values)")


def run(args) -> int:
    from sftrl_jax import config
    from sftrl_jax.sft.train import SFTConfig, train

    cfg = config.load(SFTConfig, args.config, args.overrides)
    last = train(cfg)
    print(json.dumps({k: v for k, v in last.items() if not isinstance(v, list)}, default=str))
    return 0

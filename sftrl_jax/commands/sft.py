"""`sftrl sft`: supervised fine-tuning from a YAML config with key=value overrides."""

from __future__ import annotations

from sftrl_jax.commands import config_arguments, train_from_config

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
    config_arguments(parser, configs="configs/sft/*.yaml")


def run(args) -> int:
    from sftrl_jax.sft.train import SFTConfig, train

    return train_from_config(SFTConfig, train, args)

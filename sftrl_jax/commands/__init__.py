"""The CLI's commands (`sftrl_jax.cli` lists them); what several of them share."""

from __future__ import annotations

import json


def config_arguments(parser, *, configs: str) -> None:
    """`--config` (a YAML experiment file from `configs`) and `key.sub=value` overrides."""
    parser.add_argument("--config", required=True, help=f"YAML experiment file ({configs})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (YAML values)")


def train_from_config(config_cls, train, args) -> int:
    """Loads `config_cls` from `--config` + overrides, runs `train(cfg)`, prints its last row."""
    from sftrl_jax import config

    last = train(config.load(config_cls, args.config, args.overrides))
    print(json.dumps({k: v for k, v in last.items() if not isinstance(v, list)}, default=str))
    return 0

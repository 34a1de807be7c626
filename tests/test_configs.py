"""Every shipped config parses into its dataclass and starts with the command that runs it."""

from pathlib import Path

import pytest

from sftrl_jax import config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))


def _cls(path: Path):
    kind = path.parent.name
    if kind == "sft":
        from sftrl_jax.sft.train import SFTConfig

        return SFTConfig
    if kind == "rl":
        from sftrl_jax.rl.config import RLConfig

        return RLConfig
    if kind == "demo":
        from sftrl_jax.demo import DemoConfig

        return DemoConfig
    if kind == "study":
        if path.name.startswith("pretrain"):  # the base's pretraining stages: SFT runs
            from sftrl_jax.sft.train import SFTConfig

            return SFTConfig
        from sftrl_jax.study import StudyConfig

        return StudyConfig
    raise AssertionError(f"no dataclass for configs/{kind}: add it here")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# sftrl ") or first.startswith("# make "), first
    cfg = config.load(_cls(path), path)
    assert config.to_dict(cfg)

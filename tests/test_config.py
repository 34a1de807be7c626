"""Config loading: YAML -> frozen dataclasses, overrides as YAML scalars, clear errors."""

import dataclasses
from typing import Literal

import pytest

from sftrl_jax import config
from sftrl_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-6
    warmup: float = 0.03
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass(frozen=True)
class Exp:
    name: str = "x"
    steps: int = 10
    task: Literal["gp-l", "gp-vl"] = "gp-l"
    resume: bool = False
    init: str | None = None
    optim: Optim = dataclasses.field(default_factory=Optim)
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")


def test_file_and_overrides(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("name: run\nsteps: 5\noptim:\n  lr: 1e-5\ntags: [a, b]\n")
    cfg = config.load(Exp, p, ["optim.betas=[0.8, 0.9]", "resume=true", "init=null", "task=gp-vl"])
    assert cfg == Exp(
        name="run",
        steps=5,
        task="gp-vl",
        resume=True,
        init=None,
        optim=Optim(lr=1e-5, betas=(0.8, 0.9)),
        tags=("a", "b"),
    )
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3  # type: ignore[misc]


def test_overrides_never_eval(tmp_path):
    # A Python expression is just a string to YAML; for an int field it is a type error.
    with pytest.raises(ConfigError, match=r"'steps': expected int, got \"__import__\('os'\)"):
        config.load(Exp, None, ["steps=__import__('os').system('false')"])
    cfg = config.load(Exp, None, ["name=__import__('os')"])
    assert cfg.name == "__import__('os')"


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        config.load(Exp, None, ["optim.lrr=1"])
    p = tmp_path / "bad.yaml"
    p.write_text("stpes: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'stpes' \(did you mean 'steps'\?\)"):
        config.load(Exp, p)


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"'optim.lr': expected float, got 'fast' \(str\)"):
        config.load(Exp, None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"'resume': expected bool, got 1 \(int\)"):
        config.load(Exp, None, ["resume=1"])
    with pytest.raises(ConfigError, match=r"'task': 'gp-x' is not one of 'gp-l', 'gp-vl'"):
        config.load(Exp, None, ["task=gp-x"])
    with pytest.raises(ConfigError, match=r"'optim.betas': expected 2 items, got 3"):
        config.load(Exp, None, ["optim.betas=[1, 2, 3]"])
    with pytest.raises(ConfigError, match="steps must be positive, got 0"):
        config.load(Exp, None, ["steps=0"])


def test_bad_override_syntax_and_sections():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        config.load(Exp, None, ["steps"])
    with pytest.raises(ConfigError, match=r"'steps' is a value \(10\), not a section"):
        config.apply_overrides({"steps": 10}, ["steps.x=1"])
    with pytest.raises(ConfigError, match="config section 'optim': expected a mapping"):
        config.load(Exp, None, ["optim=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(Exp, tmp_path / "nope.yaml")
    p = tmp_path / "b.yaml"
    p.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config.load(Exp, p)


def test_include_and_round_trip(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 7\noptim:\n  lr: 0.1\n  warmup: 0.5\n")
    (tmp_path / "top.yaml").write_text("include: base.yaml\noptim:\n  lr: 0.2\n")
    cfg = config.load(Exp, tmp_path / "top.yaml")
    assert (cfg.steps, cfg.optim.lr, cfg.optim.warmup) == (7, 0.2, 0.5)
    config.dump_yaml(cfg, tmp_path / "out.yaml")
    assert config.load(Exp, tmp_path / "out.yaml") == cfg
    assert config.replace(cfg, ["steps=3"]).steps == 3

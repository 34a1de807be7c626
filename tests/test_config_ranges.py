"""Every number of a run's config is finite and in range, refused at config time in one line naming
the full key and the value (issue #32.6: `ppo.clip=nan` trained with loss nan and exited 0)."""

import math
import time

import pytest

from sftrl_jax import config
from sftrl_jax.config import ConfigError

RL = "configs/rl/gp_l_tiny.yaml"
SFT = "configs/sft/gp_l_tiny.yaml"

# (override, key named, value shown); the value shown is how the message prints it
RL_BAD = [
    ("ppo.clip=nan", "ppo.clip", "nan"),
    ("ppo.clip=-1", "ppo.clip", "-1.0"),
    ("ppo.value_coef=nan", "ppo.value_coef", "nan"),
    ("ppo.kl_coef=nan", "ppo.kl_coef", "nan"),
    ("grpo.clip=nan", "grpo.clip", "nan"),
    ("sampling.top_p=nan", "sampling.top_p", "nan"),
    ("sampling.temperature=.inf", "sampling.temperature", "inf"),
    ("ppo.gamma=nan", "ppo.gamma", "nan"),
    ("ppo.gamma=1.5", "ppo.gamma", "1.5"),
    ("ppo.lam=-0.1", "ppo.lam", "-0.1"),
    ("ppo.value_clip=nan", "ppo.value_clip", "nan"),
    ("ppo.max_ratio=.inf", "ppo.max_ratio", "inf"),
    ("ppo.entropy_coef=-.inf", "ppo.entropy_coef", "-inf"),
    ("ppo.thought_coef=nan", "ppo.thought_coef", "nan"),
    ("ppo.epochs=0", "ppo.epochs", "0"),
    ("ppo.micro_batch=0", "ppo.micro_batch", "0"),
    ("grpo.clip_high=-1", "grpo.clip_high", "-1.0"),
    ("grpo.kl_coef=nan", "grpo.kl_coef", "nan"),
    ("grpo.samples_per_step=0", "grpo.samples_per_step", "0"),
    ("ppo.tis_cap=nan", "ppo.tis_cap", "nan"),
    ("grpo.tis_cap=-1", "grpo.tis_cap", "-1.0"),
    ("sampling.top_p=0", "sampling.top_p", "0.0"),
    ("sampling.top_p=1.5", "sampling.top_p", "1.5"),
    ("sampling.top_k=-1", "sampling.top_k", "-1"),
    ("sampling.max_new_tokens=0", "sampling.max_new_tokens", "0"),
    ("sampling.max_new_tokens=1000000000", "sampling.max_new_tokens", "1000000000"),
    ("eval.temperature=nan", "eval.temperature", "nan"),
    ("eval.batch_size=0", "eval.batch_size", "0"),
    ("eval.episodes=0", "eval.episodes", "0"),
    ("eval.every=-1", "eval.every", "-1"),
    ("env.num_envs=0", "env.num_envs", "0"),
    ("train.seed=-1", "train.seed", "-1"),
    ("train.keep=0", "train.keep", "0"),
    ("train.save_every=0", "train.save_every", "0"),
    ("train.length_buckets=[0,512]", "train.length_buckets[0]", "0"),
    ("optim.lr=nan", "optim.lr", "nan"),
    ("optim.b1=nan", "optim.b1", "nan"),
]


@pytest.mark.parametrize("override, key, shown", RL_BAD, ids=[o for o, _, _ in RL_BAD])
def test_rl_settings_out_of_range_are_refused(override, key, shown):
    with pytest.raises(ConfigError) as e:
        config.load(config_cls("rl"), RL, [override])
    message = str(e.value)
    assert "\n" not in message and RL in message, message
    assert f"{key}" in message and f"got {shown}" in message, message


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "env.options.verify_iter=0",
            r"env\.options \(gp-l, split train\): option 'verify_iter' must be an integer >= 1, got 0",
        ),
        ("env.options.target=.nan", r"option 'target' must be an integer"),
        ("env.options.repeat_penalty=.nan", r"option 'repeat_penalty' must be a number in \[-100, 0\], got nan"),
        ("env.options.colour=red", r"unknown option 'colour'"),
        ("eval.splits=[ood-visual]", r"eval\.splits: 'ood-visual': gp-l has no visual variant"),
    ],
)
def test_rl_env_options_and_eval_splits_are_refused_by_the_env(override, match):
    with pytest.raises(ConfigError, match=match):
        config.load(config_cls("rl"), RL, [override])


def test_virl_env_options_are_refused_by_the_env():
    with pytest.raises(ConfigError, match=r"env\.options \(virl-l, split train\): option 'verify_iter' must be"):
        config.load(config_cls("rl"), RL, ["env.task=virl-l", "env.options={}", "env.options.verify_iter=0"])
    with pytest.raises(ConfigError, match=r"option 'drop_rate' must be a number in \[0, 1\], got nan"):
        config.load(config_cls("rl"), RL, ["env.task=virl-l", "env.options={}", "env.options.drop_rate=.nan"])


@pytest.mark.parametrize(
    "override, key, shown",
    [
        ("data.seed=-1", "data.seed", "-1"),
        ("data.epochs=0", "data.epochs", "0"),
        ("data.max_images=0", "data.max_images", "0"),
        ("data.max_length=1000000000", "data.max_length", "1000000000"),
        ("data.buckets=[64,1000000000]", "data.buckets[1]", "1000000000"),
        ("train.eval_every=-1", "train.eval_every", "-1"),
        ("train.devices=0", "train.devices", "0"),
        ("optim.warmup_ratio=nan", "optim.warmup_ratio", "nan"),
        ("optim.grad_clip=.inf", "optim.grad_clip", "inf"),
    ],
)
def test_sft_settings_out_of_range_are_refused(override, key, shown):
    with pytest.raises(ConfigError) as e:
        config.load(config_cls("sft"), SFT, [override])
    assert key in str(e.value) and f"got {shown}" in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "kind, override, key, shown",
    [
        ("study", "warmup.lr=nan", "warmup.lr", "nan"),
        ("study", "warmup.revisions=1.5", "warmup.revisions", "1.5"),
        ("study", "arms.temperature=0", "arms.temperature", "0.0"),
        ("study", "arms.group_size=1", "arms.group_size", "1"),
        ("study", "arms.rl_lr=.inf", "arms.rl_lr", "inf"),
        ("study", "seeds=[0,-1]", "seeds[1]", "-1"),
        ("study", "kl_prompts=0", "kl_prompts", "0"),
        ("study", "eval_splits=[ood-visual]", "eval_splits", "'ood-visual'"),
        ("demo", "arms.temperature=nan", "arms.temperature", "nan"),  # the demo is a study config
        ("demo", "warmup.lr=-1", "warmup.lr", "-1.0"),
        ("demo", "arms.micro_batch=0", "arms.micro_batch", "0"),
        ("demo", "eval_episodes=0", "eval_episodes", "0"),
    ],
)
def test_study_and_demo_settings_out_of_range_are_refused(kind, override, key, shown):
    with pytest.raises(ConfigError) as e:
        config.load(config_cls(kind), None, [override])
    assert key in str(e.value) and shown in str(e.value), str(e.value)


def test_check_ranges_words_and_edges():
    check = config.check_range
    for value, interval, rule in [
        (math.nan, "(0, inf)", "a finite number > 0"),
        (math.inf, "[0, inf)", "a finite number >= 0"),
        (-1, "[0, inf)", "an integer >= 0"),
        (0.0, "(0, 1]", "a finite number in (0, 1]"),
        (10**5000, "[1, 4096]", "an integer in [1, 4096]"),  # past int -> str's digit limit
        (True, "[0, 1]", "a finite number in [0, 1]"),  # a bool is not a number here
        ("1", "[0, 1]", "a finite number in [0, 1]"),
    ]:
        with pytest.raises(config.RangeError) as e:
            check("k", value, interval)
        assert e.value.rule == rule and len(str(e.value)) < 120, str(e.value)
    for value, interval in [(1, "(0, 1]"), (0, "[0, inf)"), (0.5, "[0, 1]"), (4096, "[1, 4096]")]:
        check("k", value, interval)


def test_cli_rl_refuses_a_nan_setting_before_building_anything(monkeypatch, capsys):
    """`sftrl rl ... ppo.clip=nan`: one line and exit 2, from the config (the run is never started)."""
    from sftrl_jax import cli
    from sftrl_jax.rl import train as rl_train

    def never(cfg):
        raise AssertionError("training started")

    monkeypatch.setattr(rl_train, "train", never)
    start = time.perf_counter()
    assert cli.main(["rl", "--config", RL, "ppo.clip=nan"]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sftrl rl: error: {RL}: config key 'ppo.clip' must be a finite number > 0, got nan"]


def config_cls(kind: str):
    if kind == "rl":
        from sftrl_jax.rl.config import RLConfig

        return RLConfig
    if kind == "sft":
        from sftrl_jax.sft.train import SFTConfig

        return SFTConfig
    from sftrl_jax.study import StudyConfig  # "study" and "demo" (configs/demo/cpu.yaml is a study config)

    return StudyConfig

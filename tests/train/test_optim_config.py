"""Optimiser values that would train on NaN or diverge silently are refused when the config is read
(issue 23 item 8): non-finite learning rates, clips, betas, epsilons and decays."""

from __future__ import annotations

import pytest

from sftrl_jax import cli, config
from sftrl_jax.train.optim import OptimConfig


@pytest.mark.parametrize(
    "override, needle",
    [
        ("optim.lr=nan", "optim.lr must be a finite number >= 0, got nan"),
        ("optim.lr=.nan", "optim.lr must be a finite number >= 0, got nan"),
        ("optim.lr=.inf", "optim.lr must be a finite number >= 0, got inf"),
        ("optim.lr=-1e-3", "optim.lr must be a finite number >= 0, got -0.001"),
        ("optim.grad_clip=.nan", "optim.grad_clip must be a finite number > 0 or null, got nan"),
        ("optim.grad_clip=.inf", "optim.grad_clip must be a finite number > 0 or null, got inf"),
        ("optim.b1=nan", "optim.b1 must be in [0, 1), got nan"),
        ("optim.b1=1", "optim.b1 must be in [0, 1), got 1.0"),
        ("optim.b2=5", "optim.b2 must be in [0, 1), got 5.0"),
        ("optim.b2=-0.1", "optim.b2 must be in [0, 1), got -0.1"),
        ("optim.eps=nan", "optim.eps must be a finite number > 0, got nan"),
        ("optim.eps=0", "optim.eps must be a finite number > 0, got 0.0"),
        ("optim.weight_decay=.inf", "optim.weight_decay must be a finite number >= 0, got inf"),
        ("optim.min_lr=nan", "optim.min_lr must be a finite number >= 0, got nan"),
        ("optim.warmup_ratio=nan", "optim.warmup_ratio must be in [0, 1), got nan"),
    ],
)
def test_bad_optimiser_values_are_refused(override, needle):
    with pytest.raises(config.ConfigError) as e:
        config.load(OptimConfig, None, [override.removeprefix("optim.")])
    assert needle in str(e.value), str(e.value)


def test_defaults_and_paper_values_are_accepted():
    OptimConfig()
    OptimConfig(lr=1e-6, eps=1e-7, grad_clip=0.01, min_lr=1e-9, warmup_ratio=0.0)
    OptimConfig(lr=0.0, grad_clip=None, b1=0.0, b2=0.0)


@pytest.mark.parametrize("command, path", [("sft", "configs/sft/gp_l_tiny.yaml"), ("rl", "configs/rl/gp_l_tiny.yaml")])
def test_cli_refuses_nan_lr(tmp_path, capsys, command, path):
    code = cli.main([command, "--config", path, f"train.run_dir={tmp_path / 'run'}", "optim.lr=nan"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "optim.lr must be a finite number" in err, err
    assert not (tmp_path / "run").exists()

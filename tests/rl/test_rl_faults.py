"""RL fault paths end to end (issues 23, 32): GRPO and PPO killed (SIGKILL) while a checkpoint is
being written, and SIGTERM from outside. The resumed run logs each update once, with the metrics and
final parameters of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sftrl_jax.errors import UserError
from sftrl_jax.rl.train import Trainer
from sftrl_jax.train import checkpoint as ckpt_lib
from sftrl_jax.train.metrics import read_jsonl
from tests.rl.test_rl_train import final_params, make, untimed
from tests.sft.test_sft_faults import KILL_DURING_SAVE, sigterm_after

RUN_RL = "from sftrl_jax.rl.config import RLConfig; from sftrl_jax.rl.train import train; " + (
    "train(config.load(RLConfig, sys.argv[1]))"
)
UPDATES = 3
GRPO = dict(algo__="grpo", train__updates=UPDATES)
PPO = dict(algo__="ppo", train__updates=UPDATES)


@pytest.fixture(scope="module")
def xla_env(tmp_path_factory):
    """A persistent XLA cache for this module (see tests/sft/test_sft_faults.py)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path_factory.mktemp("xla_cache"))
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield dict(os.environ, JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    for k, v in before.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def full(tmp_path_factory, xla_env):
    cfg = make(tmp_path_factory.mktemp("grpo_full"), "full", **GRPO)
    Trainer(cfg).run()
    rows = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    return untimed(rows), final_params(cfg.train.run_dir)


def _same_as_full(run_dir, full):
    rows, params = full
    got = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in got] == list(range(1, UPDATES + 1))  # each update once
    assert untimed(got) == rows
    mine = final_params(run_dir)
    assert mine.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(mine[k], params[k], err_msg=k)


def _sigkill_while_a_checkpoint_is_written(tmp_path, over, full, xla_env):
    cfg = make(tmp_path, "killed", **over)
    code = KILL_DURING_SAVE.format(kill_step=2, run=RUN_RL)
    marker = tmp_path / "writing"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "killed.yaml"), str(marker)],
        capture_output=True,
        text=True,
        timeout=900,
        env=xla_env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert os.path.isdir(marker.read_text())  # the half-written temporary folder of update 2
    with ckpt_lib.Checkpointer(os.path.join(cfg.train.run_dir, "checkpoints"), async_save=False) as ck:
        assert ck.latest_step() == 1
    assert [r["step"] for r in read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))] == [1, 2]
    trainer = Trainer(cfg)
    assert trainer.update_idx == 1
    trainer.run()
    _same_as_full(cfg.train.run_dir, full)


@pytest.mark.slow  # 36 s cold with its fixture; SIGKILL mid-save stays in the default suite for SFT (test_sft_faults)
def test_grpo_sigkill_while_a_checkpoint_is_written(tmp_path, full, xla_env):
    _sigkill_while_a_checkpoint_is_written(tmp_path, GRPO, full, xla_env)


@pytest.fixture(scope="module")
def full_ppo(tmp_path_factory, xla_env):
    cfg = make(tmp_path_factory.mktemp("ppo_full"), "full", **PPO)
    Trainer(cfg).run()
    rows = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    return untimed(rows), final_params(cfg.train.run_dir)


@pytest.mark.slow  # ~60 s with its uninterrupted run (~48 s); GRPO's twin above stays in the default suite
def test_ppo_sigkill_while_a_checkpoint_is_written(tmp_path, full_ppo, xla_env):
    """PPO's episodes run across updates: the resumed run replays the ones in progress at update 1
    (from the checkpoint's rollout state) and ends with the uninterrupted run's metrics and params."""
    _sigkill_while_a_checkpoint_is_written(tmp_path, PPO, full_ppo, xla_env)


# Updates slowed by 1 s so that the test's SIGTERM arrives mid-run; only SIGTERM saves (save_every 10).
SLOW_RL = textwrap.dedent("""
    import sys, time
    from sftrl_jax import config
    from sftrl_jax.rl.config import RLConfig
    from sftrl_jax.rl import train as rl_train
    update = rl_train.Trainer.update
    def slow(self):
        out = update(self)
        time.sleep(1.0)
        return out
    rl_train.Trainer.update = slow
    rl_train.train(config.load(RLConfig, sys.argv[1]))
""")


def test_rl_sigterm_end_to_end(tmp_path, full, xla_env):
    cfg = make(tmp_path, "sigterm", **GRPO, train__save_every=10)
    metrics = os.path.join(cfg.train.run_dir, "metrics.jsonl")
    proc = sigterm_after(SLOW_RL, tmp_path / "sigterm.yaml", metrics, rows=1, env=xla_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if "SIGTERM received" in x)
    saved = int(line.split("saved update ")[1].split()[0])
    assert 1 <= saved < UPDATES, line
    assert not os.path.exists(os.path.join(cfg.train.run_dir, "final"))
    with ckpt_lib.Checkpointer(os.path.join(cfg.train.run_dir, "checkpoints"), async_save=False) as ck:
        assert ck.all_steps() == [saved]  # written by the SIGTERM handler, not the interval
    trainer = Trainer(cfg)
    assert trainer.update_idx == saved
    trainer.run()
    _same_as_full(cfg.train.run_dir, full)


def test_max_bad_updates_stops_the_run_and_keeps_checkpoints(tmp_path, xla_env):
    cfg = make(tmp_path, "bad", **GRPO, train__max_bad_updates=2)
    trainer = Trainer(cfg)
    trainer.update = lambda: {"finite": 0.0, "loss": float("nan")}  # non-finite gradients every update
    with pytest.raises(UserError) as e:
        trainer.run()
    assert str(e.value) == "rl: 2 updates in a row had non-finite gradients; aborting (last checkpoint: update 1)"
    with ckpt_lib.Checkpointer(os.path.join(cfg.train.run_dir, "checkpoints"), async_save=False) as ck:
        assert ck.all_steps() == [1]
    assert [r["step"] for r in read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))] == [1]

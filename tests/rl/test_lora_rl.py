"""LoRA and QLoRA RL end to end on a tiny random Llama (GP-L): GRPO moves the adapters once the rewards
of a group differ, and the sampler decodes with them; PPO and GRPO, with LoRA and QLoRA, log finite
rewards and losses every update and move the adapters only; a LoRA run SIGKILLed right after a
checkpoint resumes bit for bit (adapters, value head, final model, metrics)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import sampling
from sftrl_jax.envs.general_points.env import GeneralPointsEnv
from sftrl_jax.models import lora
from sftrl_jax.rl import grpo as grpo_lib
from sftrl_jax.train.metrics import read_jsonl
from tests.rl.test_rl_train import KILL_AFTER_SAVE, final_params, untimed
from tests.train.test_lora import _rl_trainer

GRPO = {"group_size": 2, "samples_per_step": 4, "micro_batch": 4}
PPO = {"epochs": 1, "samples_per_step": 4, "micro_batch": 4}
# GRPO: one graded attempt per episode (then the step-limit turn), so an update of 2 prompts x 2 episodes
# is 8 turns, two optimiser steps. PPO (2 turns of 4 envs per update whatever the episodes): GP's own 5
# attempts, so episodes run across updates (and across the SIGKILL test's checkpoint).
ENV = {"grpo": {"task": "gp-l", "num_envs": 4, "options": {"verify_iter": 1}}, "ppo": {"task": "gp-l", "num_envs": 4}}
# A constant learning rate: GRPO's schedule counts one step per update here (`GRPOConfig.steps_per_update`
# estimates prompts x group_size / samples_per_step, one turn per episode), so its cosine would reach
# lr 0 at the second step and leave every A where it started.
OPTIM = {"lr": 5.0e-2, "grad_clip": 1.0, "schedule": "constant"}
PROMPT = [[1, 17, 42, 99, 7, 300, 12]]


def text_dependent_step(real):
    """GP's `step` with 0.01 per character of the answer added to the reward. A random policy breaks
    every rule alike (each episode of a group gets the same table rewards, so every GRPO advantage
    and gradient is 0); with this the returns of a group differ by the sampled tokens, deterministically,
    and everything after the env (runner, turns, returns, advantages, logging) is the real code."""

    def step(self, text):
        obs, reward, terminated, truncated, info = real(self, text)
        return obs, reward + 0.01 * len(text), terminated, truncated, info

    return step


# The same patch in a subprocess (the SIGKILL test), before its run starts.
PATCH_IN_SUBPROCESS = (
    "from sftrl_jax.envs.general_points.env import GeneralPointsEnv\n"
    "from tests.rl.test_lora_rl import text_dependent_step\n"
    "GeneralPointsEnv.step = text_dependent_step(GeneralPointsEnv.step)\n"
)


@pytest.fixture
def text_reward(monkeypatch):
    monkeypatch.setattr(GeneralPointsEnv, "step", text_dependent_step(GeneralPointsEnv.step))


def _parts(trainer):
    """(trainable, frozen) of the trainer's parameters as {path: numpy array}."""
    return tuple(
        {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(part)}
        for part in lora.partition(trainer.harness.state.params)
    )


def _greedy(model):
    r = sampling.generate(model, PROMPT, max_new_tokens=6, temperature=0.0)
    return np.asarray(r.tokens), np.asarray(r.logprobs_raw)


def _algo_sections(algo, quantize=None):
    sections = {"algo": algo, "env": ENV[algo], "optim": OPTIM, algo: GRPO if algo == "grpo" else PPO}
    if quantize is not None:
        sections["lora"] = {"rank": 4, "alpha": 8, "quantize": quantize}
    return sections


# ~22 s alone on 2 cores: in the default suite, in place of a weaker GRPO test of the same cost (whose
# tiny random policy earned equal rewards in every group, so its gradient was 0).
def test_grpo_with_lora_moves_the_adapters_once_a_groups_rewards_differ(tmp_path, text_reward, monkeypatch):
    """One GRPO update (two optimiser steps) with rewards that differ within each group: non-zero
    advantages and gradient, every adapter moved (B from the first step, A from the second), the base
    bit for bit the same, and the sampler decodes with the new adapters (its greedy log-probs equal
    those of the adapters merged into the weights)."""
    advantages = []
    real = grpo_lib.episode_advantages
    monkeypatch.setattr(
        grpo_lib, "episode_advantages", lambda *a, **k: advantages.append(real(*a, **k)) or advantages[-1]
    )
    trainer = _rl_trainer(tmp_path, "grpo", updates=2, **_algo_sections("grpo"))
    trainable0, frozen0 = _parts(trainer)
    before = _greedy(trainer.learner.lm())
    trainer.run(stop_after=1)  # one update, no final/ (the test below checks it)
    trainable1, frozen1 = _parts(trainer)

    row = read_jsonl(os.path.join(str(tmp_path / "grpo"), "metrics.jsonl"))[-1]
    assert row["train/turns"] == 8 and row["train/episodes_finished"] == 4, row
    assert len(advantages) == 1 and np.abs(advantages[0]).min() > 0.5, advantages  # +-1 in every group of 2
    assert np.isfinite(row["train/loss"]) and row["train/grad_norm"] > 0, row
    assert frozen0.keys() == frozen1.keys() and len(frozen0) > 0
    for k in frozen0:
        np.testing.assert_array_equal(frozen1[k], frozen0[k], err_msg=k)
    assert trainable0.keys() == trainable1.keys() and len(trainable0) == 2 * 7 * 2  # A, B of 7 weights x 2 layers
    still = [k for k in trainable0 if np.array_equal(trainable0[k], trainable1[k])]
    assert still == [], still

    lm = trainer.learner.lm()
    after, merged = _greedy(lm), _greedy(lora.merge(nnx.clone(lm)))
    assert not np.allclose(after[1], before[1], atol=1e-4), (after, before)
    np.testing.assert_array_equal(after[0], merged[0])
    np.testing.assert_allclose(after[1], merged[1], atol=1e-5, rtol=0)


# 30-40 s each on 2 busy cores (compiling sampler, passes and update step is most of it): all slow. The
# default suite keeps a LoRA GRPO update (the test above) and a LoRA PPO update
# (tests/train/test_lora.py::test_the_sampler_decodes_with_the_adapters_of_the_current_update).
@pytest.mark.slow
@pytest.mark.parametrize(("algo", "quantize"), [("ppo", None), ("grpo", None), ("ppo", "int4"), ("grpo", "int8")])
def test_lora_and_qlora_rl_log_rewards_and_losses_and_train_the_adapters_only(tmp_path, text_reward, algo, quantize):
    """Three updates of PPO / GRPO on a LoRA or QLoRA policy: metrics.jsonl has one row per update with
    a finite `train/reward_mean` (the mean reward per turn) and `train/loss`, a positive finite
    `train/grad_norm`; the adapters (and PPO's value head) moved, the base (QLoRA: its integer weights)
    did not."""
    updates = 3
    trainer = _rl_trainer(tmp_path, "run", updates=updates, **_algo_sections(algo, quantize))
    trainable0, frozen0 = _parts(trainer)
    trainer.run()
    trainable1, frozen1 = _parts(trainer)

    rows = read_jsonl(os.path.join(str(tmp_path / "run"), "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, updates + 1))
    for r in rows:
        for key in ("train/reward_mean", "train/loss", "train/grad_norm"):
            assert key in r and np.isfinite(r[key]), (key, r)
        assert r["train/grad_norm"] > 0 and r["train/finite"] == 1.0 and r["train/turns"] == 8, r
    rewards = [r["train/reward_mean"] for r in rows]
    assert all(-4 < x < 5 for x in rewards), rewards  # the table's range plus 0.01 per character

    if quantize is not None:
        dtypes = {v.dtype for v in frozen0.values()}
        assert np.dtype(quantize) in dtypes, dtypes  # the base is stored quantized ...
    for k in frozen0:  # ... and stays as it was
        np.testing.assert_array_equal(frozen1[k], frozen0[k], err_msg=k)
    adapters = [k for k in trainable0 if "lora_" in k]
    head = [k for k in trainable0 if "value_head" in k]
    assert len(adapters) == 2 * 7 * 2 and sorted(adapters + head) == sorted(trainable0)
    assert (len(head) > 0) == (algo == "ppo")
    still = [k for k in trainable0 if np.array_equal(trainable0[k], trainable1[k])]
    assert still == [], still
    assert all(v.dtype == np.float32 for v in trainable1.values())
    assert os.path.exists(os.path.join(str(tmp_path / "run"), "final", "adapter", "adapter_config.json"))


@pytest.mark.slow  # ~1 min each: an uninterrupted run, a subprocess killed after its checkpoint, the resume
@pytest.mark.parametrize(("algo", "quantize"), [("ppo", None), ("grpo", None), ("ppo", "int4")])
def test_a_lora_rl_run_killed_after_a_checkpoint_resumes_bitwise(tmp_path, xla_cache, text_reward, algo, quantize):
    """3 updates; a second run SIGKILLed right after the checkpoint of update 1 and resumed ends with
    the uninterrupted run's trainable parameters (adapters, PPO's value head: the train state), final
    model (the adapters merged) and metrics rows, bit for bit. PPO's episodes in progress at the
    checkpoint are replayed from its rollout state."""
    updates, kill_step = 3, 1
    sections = _algo_sections(algo, quantize)  # QLoRA: the int4 base re-quantized from the base on resume
    full = _rl_trainer(tmp_path, "full", updates=updates, **sections)
    full.run()
    full_trainable, full_frozen = _parts(full)

    _rl_trainer(tmp_path, "killed", updates=updates, **sections).close()  # writes killed.yaml
    run_dir = str(tmp_path / "killed")
    code = PATCH_IN_SUBPROCESS + KILL_AFTER_SAVE.format(kill_step=kill_step)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "killed.yaml")],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, **xla_cache),
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),  # `tests` importable
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(run_dir, "final"))
    assert [r["step"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] == [1]

    resumed = _rl_trainer(tmp_path, "killed", updates=updates, **sections)
    assert resumed.update_idx == kill_step
    if algo == "ppo":  # episodes were in progress at the checkpoint: they are replayed
        saved = resumed.learner._rollout_state
        assert saved is not None and any(row["texts"] for row in saved["envs"]), saved
    resumed.run()
    trainable, frozen = _parts(resumed)

    assert trainable.keys() == full_trainable.keys() and frozen.keys() == full_frozen.keys()
    assert any("value_head" in k for k in trainable) == (algo == "ppo")
    for k in trainable:
        np.testing.assert_array_equal(trainable[k], full_trainable[k], err_msg=k)
    for k in frozen:
        np.testing.assert_array_equal(frozen[k], full_frozen[k], err_msg=k)
    a, b = final_params(str(tmp_path / "full")), final_params(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    rows_full = read_jsonl(os.path.join(str(tmp_path / "full"), "metrics.jsonl"))
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(1, updates + 1))  # each update logged once
    assert untimed(rows) == untimed(rows_full)
    assert len({r["train/reward_mean"] for r in rows}) > 1  # the updates differ: a real comparison

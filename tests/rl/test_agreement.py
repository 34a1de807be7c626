"""Sampler/trainer agreement (issue #33): every update logs the fraction of response tokens whose
trainer/sampler probability ratio at the rollout's parameters is outside [0.9, 1.1] and the mean
|log ratio|; truncated importance sampling (`tis_cap`) weights the policy term by
min(pi_old / pi_sampler, C). fp32 on CPU: the two agree (0 outside the band); bf16: they do not."""

import math
import os

import numpy as np
import pytest

from sftrl_jax.config import ConfigError
from sftrl_jax.rl import grpo, losses, ppo
from sftrl_jax.rl.train import Trainer
from sftrl_jax.train.metrics import read_jsonl
from tests.rl.test_rl_train import TINY, make

AGREEMENT = ("train/sampler_mismatch_frac", "train/sampler_abs_log_ratio")


def rows_of(cfg):
    return read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))


# -- the losses ----------------------------------------------------------------------------------


def test_sampler_agreement_hand_computed():
    trainer = np.array([-1.0, -2.0, -0.5, -3.0], np.float32)
    sampler = trainer - np.array([0.0, 0.05, -0.2, 0.12], np.float32)  # ratios 1, 1.051, 0.819, 1.127
    m = losses.sampler_agreement(trainer, sampler)
    assert float(m["sampler_mismatch_frac"]) == 0.5
    assert float(m["sampler_abs_log_ratio"]) == pytest.approx((0.05 + 0.2 + 0.12) / 4, rel=1e-5)
    same = losses.sampler_agreement(trainer, trainer)
    assert float(same["sampler_mismatch_frac"]) == 0.0 and float(same["sampler_abs_log_ratio"]) == 0.0


def test_truncated_is_weight_caps_and_stops_gradients():
    import jax

    log_is = np.log(np.array([0.5, 1.0, 1.5, 3.0], np.float32))
    w, aux = losses.truncated_is_weight(log_is, 2.0)
    np.testing.assert_allclose(np.asarray(w), [0.5, 1.0, 1.5, 2.0], rtol=1e-6)
    assert float(aux["tis_capped_frac"]) == 0.25
    assert float(aux["tis_weight_mean"]) == pytest.approx(5.0 / 4, rel=1e-6)
    grad = jax.grad(lambda x: losses.truncated_is_weight(x, 2.0)[0].sum())(log_is)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_grpo_loss_with_tis_hand_computed():
    # one sequence of 3 response tokens (+1 padding), A = 1, clip 0.2; ratios 1.1, 1.3 (clipped: 1.2), 0.9
    logp = np.log(np.array([[1.1, 1.3, 0.9, 7.0]], np.float32))
    old = np.zeros((1, 4), np.float32)
    mask = np.array([[1.0, 1.0, 1.0, 0.0]], np.float32)
    sampler = -np.log(np.array([[0.5, 1.0, 4.0, 1.0]], np.float32))  # pi_old / pi_sampler = 0.5, 1, 4
    w, _ = losses.truncated_is_weight(old - sampler, 2.0, mask)  # capped at 2: 0.5, 1, 2
    loss, _ = losses.grpo_loss(logp, old, np.array([1.0], np.float32), mask, clip=0.2, is_weight=w)
    expected = -(0.5 * 1.1 + 1.0 * 1.2 + 2.0 * 0.9) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    plain, _ = losses.grpo_loss(logp, old, np.array([1.0], np.float32), mask, clip=0.2)
    assert float(plain) == pytest.approx(-(1.1 + 1.2 + 0.9) / 3, rel=1e-6)


def test_ppo_policy_loss_with_tis_hand_computed():
    # two turns: ratio 1.05 with A = 2, ratio 0.8 (clipped: 0.9) with A = -1; turn IS weights 3 -> 2 and 0.25
    log_ratio = np.log(np.array([1.05, 0.8], np.float32))
    w, _ = losses.truncated_is_weight(np.log(np.array([3.0, 0.25], np.float32)), 2.0)
    loss, _ = losses.ppo_policy_loss(log_ratio, np.zeros(2, np.float32), np.array([2.0, -1.0]), clip=0.1, is_weight=w)
    # per turn: -min(r A, clip(r) A): turn 0 -2.1; turn 1 -min(-0.8, -0.9) = 0.9
    assert float(loss) == pytest.approx((2.0 * -2.1 + 0.25 * 0.9) / 2, rel=1e-6)


def test_config_range_checks_tis_cap():
    assert ppo.PPOConfig().tis_cap == 0.0 and grpo.GRPOConfig().tis_cap == 0.0
    assert ppo.PPOConfig(tis_cap=2.0).tis_cap == 2.0
    with pytest.raises(ConfigError, match=r"PPOConfig.tis_cap must be .*got nan"):
        ppo.PPOConfig(tis_cap=math.nan)
    with pytest.raises(ConfigError, match=r"GRPOConfig.tis_cap must be .*got -1.0"):
        grpo.GRPOConfig(tis_cap=-1.0)
    with pytest.raises(ConfigError, match="grpo.tis_cap must be 0 \\(off\\) or at least 1, got 0.5"):
        grpo.GRPOConfig(tis_cap=0.5)
    with pytest.raises(ConfigError, match="grpo.tis_cap needs the trainer's old log-probs"):
        grpo.GRPOConfig(tis_cap=2.0, old_logp="sampler")


def test_grpo_old_logp_auto_takes_the_trainers_where_they_differ():
    from sftrl_jax.train.state import ModelSection

    fp32, bf16 = ModelSection(preset="llama-tiny"), ModelSection(preset="llama-tiny", dtype="bfloat16")
    assert grpo.GRPOConfig().old_logp == "auto"
    assert grpo.GRPOConfig().old_logp_source(fp32) == "sampler"
    assert grpo.GRPOConfig().old_logp_source(bf16) == "trainer"
    assert grpo.GRPOConfig(tis_cap=2.0).old_logp_source(fp32) == "trainer"
    assert grpo.GRPOConfig(old_logp="sampler").old_logp_source(bf16) == "sampler"
    assert ppo.PPOConfig().old_logp_source(fp32) == "trainer"


# -- the runs ------------------------------------------------------------------------------------


def test_fp32_ppo_agrees_every_update_with_tis(tmp_path):
    """fp32 on CPU: no token outside the band, |log ratio| at rounding level, in every update's row;
    with TIS on the weights are 1 (the trainer's and the sampler's log-probs agree)."""
    cfg = make(tmp_path, "ppo", ppo__tis_cap=2.0, train__steps_per_update=1)
    Trainer(cfg).run()
    rows = rows_of(cfg)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train/sampler_mismatch_frac"] == 0.0, r
        assert r["train/sampler_abs_log_ratio"] < 1e-5, r
        assert r["train/tis_capped_frac"] == 0.0 and abs(r["train/tis_weight_mean"] - 1) < 1e-4, r


def test_fp32_grpo_agrees_every_update(tmp_path):
    """GRPO with the default old_logp (auto: the sampler's in fp32) still measures the agreement."""
    cfg = make(tmp_path, "grpo", algo__="grpo")
    assert cfg.grpo.old_logp_source(cfg.model) == "sampler"
    Trainer(cfg).run()
    rows = rows_of(cfg)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["train/sampler_mismatch_frac"] == 0.0, r
        assert r["train/sampler_abs_log_ratio"] < 1e-5, r


@pytest.mark.slow  # 29 s on 2 busy CPU cores (a 4-layer model, its programs compiled in bf16)
def test_bf16_sampling_disagrees(tmp_path):
    """bf16 compute: the sampler's decode and the trainer's forward round differently. On a tiny
    model with peaked logits (4 layers, temperature 0.2 as in the paper) measured 2.8% of tokens
    outside [0.9, 1.1] and mean |log ratio| 0.027 (trl#6789: 7.5% for a full-size bf16 model). The
    ratio's old log-probs are the trainer's (grpo.old_logp auto) and TIS weights the policy term."""
    from sftrl_jax.models.checkpoint import save_checkpoint
    from sftrl_jax.train.state import preset_config
    from tests.sampling.helpers import peaked_model

    text = {**TINY["model"]["text_overrides"], "num_layers": 4}
    save_checkpoint(peaked_model(preset_config("llama-tiny", text), seed=0), str(tmp_path / "peaked"))
    model = {"init": str(tmp_path / "peaked"), "dtype": "bfloat16"}
    cfg = make(tmp_path, "bf16", algo__="grpo", model__=model, sampling__temperature=0.2, grpo__tis_cap=2.0)
    assert cfg.grpo.old_logp_source(cfg.model) == "trainer"
    Trainer(cfg).run(stop_after=1)
    (r,) = rows_of(cfg)
    print({k: r[k] for k in (*AGREEMENT, "train/logprob_gap_first_step", "train/tis_weight_mean")})
    assert 0 < r["train/sampler_mismatch_frac"] < 0.2, r
    assert 1e-3 < r["train/sampler_abs_log_ratio"] < 0.1, r
    assert r["train/log_ratio_dev_first_step"] == 0.0  # the ratio starts at 1 against the trainer's

"""The tiny SFT config learns GP-L: loss falls on expert data AND greedy answers score better.

Slow (a few minutes on one core): 400 steps of configs/sft/gp_l_tiny.yaml on 2,000 dealt-order
expert answers with the compact prompt, then the paper's GP protocol (5 graded attempts with
feedback) on 32 fixed ID hands, before and after training. Measured on this machine (2026-11-27,
3.0 min for the whole test): mean turn reward -2.67 -> -2.52; first attempts all -3 (no legal
formula) -> 20 of 32 legal with exactly the dealt numbers (-1, wrong value), 10 at -4, mean -2.03;
success 0 (a formula equal to 24 needs luck at this size); the failed revision turns stay mostly
illegal because this SFT data has single-turn answers only (as the paper's).
"""

import collections
import json
import os
from pathlib import Path

import pytest

from sftrl_jax import config
from sftrl_jax.data.generate import generate_gp_sft
from sftrl_jax.envs.general_points import prompts
from sftrl_jax.evaluation import evaluate as ev
from sftrl_jax.sampling.policy import SamplingSection, make_policy
from sftrl_jax.sft.train import SFTConfig, train
from sftrl_jax.train.metrics import read_jsonl
from sftrl_jax.train.state import load_model, tokenizer_for

ROOT = Path(__file__).resolve().parents[2]
SHORT = {"template": str(prompts.SHORT_TEMPLATE)}


def greedy_eval(model, tokenizer, out_dir):
    policy = make_policy(model, tokenizer, SamplingSection(max_new_tokens=64), seed=0, temperature=0.0)
    proto = ev.protocol("gp-l", "id", n_episodes=32)
    summary = ev.evaluate(policy, tokenizer, proto, batch_size=32, progress=False, out_dir=out_dir, env_options=SHORT)
    turns = [json.loads(line) for line in open(os.path.join(out_dir, "turns.jsonl"))]
    first = [t["reward"] for t in turns if t["turn"] == 0]
    return summary, first


@pytest.mark.slow
def test_tiny_sft_config_lowers_loss_and_raises_greedy_reward(tmp_path):
    data = tmp_path / "gp_l_train.json"
    generate_gp_sft("gp-l", "train", 2000, data, seed=0, dealt_order=True, env_options=SHORT)
    cfg = config.load(
        SFTConfig,
        ROOT / "configs" / "sft" / "gp_l_tiny.yaml",
        [
            f"data.train_files=[{data}]",
            f"train.run_dir={tmp_path / 'run'}",
            "train.devices=1",
            "train.progress=false",
            "train.async_checkpointing=false",
            "train.log_every=1",  # the first logged loss is the untrained model's (~log 2048 = 7.6)
        ],
    )
    tokenizer = tokenizer_for(cfg.model)
    before, before_first = greedy_eval(load_model(cfg.model, seed=cfg.train.seed), tokenizer, tmp_path / "before")

    train(cfg)
    loss = [r["train/loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert loss[0] > 5.0 and loss[-1] < 0.3, loss
    after, after_first = greedy_eval(
        load_model(config.load(type(cfg.model), None, [f"init={tmp_path / 'run' / 'final'}"])),
        tokenizer,
        tmp_path / "after",
    )
    print("before", before["reward_mean"], collections.Counter(before_first), "success", before["success_rate"])
    print("after", after["reward_mean"], collections.Counter(after_first), "success", after["success_rate"])
    # An untrained model writes no legal formula: -3 on every graded turn.
    assert before["reward_mean"] <= -2.6 and max(before_first) == -3.0
    assert after["reward_mean"] > before["reward_mean"] + 0.1
    # Trained: most first answers are legal formulas over exactly the dealt numbers (-1 or +5).
    legal = sum(r >= -1 for r in after_first)
    assert legal >= 16, collections.Counter(after_first)
    assert sum(after_first) / len(after_first) > -2.5
    assert after["success_rate"] >= before["success_rate"]

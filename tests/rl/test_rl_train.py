"""The RL loop end to end on a tiny random Llama: rollouts through the sampler, PPO and GRPO updates,
trainer-sampler log-prob gap ~ 0 on the first epoch, checkpoints and resume."""

import json
import os

import pytest

from sftrl_jax import config
from sftrl_jax.rl.train import RLConfig, Trainer
from sftrl_jax.train.metrics import read_jsonl

TINY = {
    "model": {
        "preset": "llama-tiny",
        "text_overrides": {
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 1024,
        },
    },
    "env": {"task": "gp-l", "num_envs": 4},
    "sampling": {"max_new_tokens": 12, "temperature": 1.0},
    "ppo": {"epochs": 2, "samples_per_step": 4, "micro_batch": 4, "temperature": 1.0},
    "grpo": {"group_size": 2, "samples_per_step": 4, "micro_batch": 4, "temperature": 1.0},
    "optim": {"lr": 1.0e-3, "grad_clip": 1.0},
    "eval": {"every": 0, "splits": []},
    "train": {
        "updates": 2,
        "steps_per_update": 2,
        "prompts_per_update": 2,
        "length_buckets": [512, 1024],
        "devices": 1,
        "progress": False,
        "async_checkpointing": False,
    },
}


def make(tmp_path, name, **over):
    d = json.loads(json.dumps(TINY))
    d["train"]["run_dir"] = str(tmp_path / name)
    for k, v in over.items():
        a, b = k.split("__")
        d[a] = v if b == "" else {**d.get(a, {}), b: v}
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(d))
    return config.load(RLConfig, p)


def test_ppo_updates_resume_and_gap(tmp_path):
    cfg = make(tmp_path, "ppo")
    trainer = Trainer(cfg)
    trainer.run(stop_after=1)
    rows = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))
    m = rows[-1]
    assert m["train/turns"] == 8 and m["train/logprob_gap_first_step"] < 1e-5
    assert m["train/trainer_sampler_turn_logp_gap"] < 1e-4, m["train/trainer_sampler_turn_logp_gap"]
    assert m["train/gflops"] > 0 and m["train/finite"] == 1.0
    assert sum(v for k, v in m.items() if k.startswith("train/outcome/")) == 8  # every turn scored
    trainer2 = Trainer(cfg)  # resumes from update 1
    assert trainer2.update_idx == 1
    trainer2.run()
    rows = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert os.path.exists(os.path.join(cfg.train.run_dir, "final", "model_config.json"))


def test_grpo_update(tmp_path):
    cfg = make(tmp_path, "grpo", algo__="grpo")
    Trainer(cfg).run(stop_after=1)
    m = read_jsonl(os.path.join(cfg.train.run_dir, "metrics.jsonl"))[-1]
    assert m["train/episodes_finished"] == 4 and m["train/logprob_gap_first_step"] < 1e-5


def test_vl_task_needs_a_vision_model(tmp_path):
    from sftrl_jax.config import ConfigError

    with pytest.raises(ConfigError, match="has no vision tower"):
        Trainer(make(tmp_path, "vl", env__task="gp-vl"))

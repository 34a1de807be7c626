"""A whole PPO update (rollout, values, GAE, clipped step) and a whole GRPO update on 8 fake CPU
devices equal the single-device ones within 1e-5: every metric and every parameter after the step.

The policy is scripted (fixed answers, some correct, with the model's own teacher-forced log-probs as
the "sampler" log-probs), so both runs see the same turns and rewards; the sampler's own sharding is
tested in tests/sampling."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import config
from sftrl_jax.envs.general_points import expert
from sftrl_jax.episodes import Turn
from sftrl_jax.rl.config import RLConfig
from sftrl_jax.rl.train import Trainer
from sftrl_jax.sampling.logprobs import token_logprobs

TINY = {
    "model": {
        "preset": "llama-tiny",
        # heads / kv heads / MLP width divisible by a tensor axis of 2, so every mesh axis shards something
        "text_overrides": {
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 1,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 1024,
        },
    },
    "env": {"task": "gp-l", "num_envs": 4, "options": {"verify_iter": 1}},
    "sampling": {"max_new_tokens": 64, "temperature": 1.0},
    # One optimiser step: after it, turn log-probs (sums of ~40 token log-probs of size ~7) carry fp32
    # noise of ~1e-4 that exp() turns into ratio differences of ~1e-4 between ANY two runs that add in
    # another order; the first step's ratio is exactly 1.
    "ppo": {"epochs": 1, "samples_per_step": 8, "micro_batch": 4},
    "grpo": {"group_size": 2, "samples_per_step": 8, "micro_batch": 8},
    # Adam's eps is 1e-3 here (the paper: 1e-7) so that Adam does not turn rounding noise into steps: its
    # first update is lr * g / (|g| + eps), so with eps 1e-7 a gradient entry of 1e-7 +- 1e-8 (sharded
    # sums add in another order) gets a step anywhere in +-lr. Measured with eps 1e-7, lr 1e-3: every
    # metric equal within 1e-5, the gradients within 2e-5 of entries of size 1.5, yet 27 of 131072
    # lm_head weights differ by up to 1e-4 after two steps. With eps 1e-3 most weights still move by
    # ~lr, so a wrong sharded gradient would show.
    "optim": {"lr": 1.0e-3, "eps": 1.0e-3, "grad_clip": 1.0},
    "eval": {"every": 0, "splits": []},
    "train": {
        "updates": 1,
        "steps_per_update": 2,
        "prompts_per_update": 2,
        "length_buckets": [512],
        "progress": False,
        "async_checkpointing": False,
    },
}

TIMING = ("rollout_tokens_per_s", "rollout_seconds", "train_seconds")


def make(tmp_path, name, algo, **train):
    d = json.loads(json.dumps(TINY))
    d["algo"] = algo
    d["train"].update(run_dir=str(tmp_path / name), **train)
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(d))
    return config.load(RLConfig, p)


class Scripted:
    """Fixed answers: on the first call every even row answers correctly (rows are envs then), every
    other answer is a wrong formula or prose; log-probs are the model's own teacher-forced ones."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.calls = trainer, 0

    def __call__(self, contexts, images):
        tr, tok = self.trainer, self.trainer.harness.tokenizer
        out = []
        for r in range(len(contexts)):
            if self.calls == 0 and r % 2 == 0:
                env = tr.learner.envs[r]
                text = expert.format_answer(env.hand.symbols, env.puzzle.values, env.puzzle.solutions[0])
            elif (r + self.calls) % 2:
                text = expert.format_answer(["A", "2", "3", "4"], [1, 2, 3, 4], "1+2+3+4")
            else:
                text = "I am not sure how to reach 24 with these cards."
            out.append(tok.encode(text) + [tok.eot_id])
        self.calls += 1
        turns = [
            Turn(0, 0, 0, list(c), resp, [], "", 0.0, False, False, list(im), {})
            for c, resp, im in zip(contexts, out, images)
        ]
        token_logp = teacher_forced_logp(tr, tr.learner.batcher.build(turns))
        return [
            (resp, token_logp[b, len(c) - 1 : len(c) - 1 + len(resp)].tolist())
            for b, (c, resp) in enumerate(zip(contexts, out))
        ]


def teacher_forced_logp(tr, batch) -> np.ndarray:
    """[B, L] token log-probs of the current policy (logits / temperature), as the sampler returns them."""
    b = tr.learner.batcher.device(batch)
    if tr.cfg.algo == "ppo":
        return np.asarray(tr.learner.value_fn(tr.state.params, b)[2])
    if not hasattr(tr, "_test_logp_fn"):

        def logp_fn(params, b):
            model = nnx.merge(tr.harness.graphdef, params, tr.harness.rest)
            logits = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
            return token_logprobs(logits / tr.cfg.sampling.temperature, b["targets"])

        tr._test_logp_fn = jax.jit(logp_fn)
    return np.asarray(tr._test_logp_fn(tr.state.params, b))


def params(trainer):
    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(trainer.state.params)
    }


def one_update(cfg):
    trainer = Trainer(cfg)
    scripted = Scripted(trainer)
    trainer.learner.policy = lambda *a, **k: scripted
    before = params(trainer)
    with jax.set_mesh(trainer.harness.mesh):
        m = trainer.update()
    trainer.harness.checkpointer.close()
    return trainer, before, {k: v for k, v in m.items() if k not in TIMING}


# The GRPO case is slow (81 s on a cold cache): the PPO case covers all three mesh axes in the default suite.
@pytest.mark.parametrize(
    "algo,mesh",
    [("ppo", "data=2,fsdp=2,tensor=2"), pytest.param("grpo", "data=1,fsdp=-1,tensor=1", marks=pytest.mark.slow)],
)
def test_eight_devices_match_one(tmp_path, algo, mesh, monkeypatch):
    assert jax.device_count() == 8
    # The subject is the partitioning: both runs multiply on XLA's dot. (On one CPU device the steps
    # use OpenBLAS by default, `ops.Policy(cpu_kernels=True)`, whose agreement with XLA's dot is tested in
    # tests/models/test_cpu_gemm.py; with it this PPO step's grad norm differed by 1.2e-5 relative.)
    monkeypatch.setenv("SFTRL_CPU_GEMM", "0")
    t1, p1_before, m1 = one_update(make(tmp_path, "one", algo, devices=1))
    t8, p8_before, m8 = one_update(make(tmp_path, "eight", algo, mesh=mesh))
    assert dict(t8.harness.mesh.shape) == (
        {"data": 2, "fsdp": 2, "tensor": 2} if algo == "ppo" else {"data": 1, "fsdp": 8, "tensor": 1}
    )
    sharded = [
        k
        for k, v in jax.tree_util.tree_leaves_with_path(t8.state.params)
        if len(v.sharding.device_set) == 8 and not v.sharding.is_fully_replicated
    ]
    assert sharded, "no parameter is sharded on the 8-device mesh"
    for k in p1_before:  # the same initial weights on both meshes
        np.testing.assert_array_equal(p1_before[k], p8_before[k], err_msg=k)
    # The scripted rollout scored turns of every kind and the step moved the weights.
    # PPO: 2 lock-step turns of 4 envs. GRPO: 2 groups x 2 episodes, 1 turn when solved, else 2 (the
    # second is the step-limit turn of verify_iter 1).
    assert m1["turns"] == (8 if algo == "ppo" else 6)
    assert m1.get("outcome/CORRECT", 0) >= 1 and m1["grad_norm"] > 0
    assert m1.keys() == m8.keys()
    noise = ("logprob_gap_first_step", "trainer_sampler_turn_logp_gap")
    for k in [k for k in noise if k in m1]:
        # |trainer - sampler| log-prob gaps are rounding noise of two fp32 forwards in each run (sums of
        # ~40 token log-probs of magnitude ~7): each is checked to be tiny, not equal to the other's noise.
        assert m1[k] < 1e-4 and m8[k] < 1e-4, (k, m1[k], m8[k])
    for k in [k for k in m1 if k not in noise]:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-5, err_msg=k)
    p1, p8 = params(t1), params(t8)
    moved = max(float(np.abs(p1[k] - p1_before[k]).max()) for k in p1)
    assert moved > 1e-4, moved
    for k in p1:
        np.testing.assert_allclose(p8[k], p1[k], rtol=1e-5, atol=1e-5, err_msg=k)

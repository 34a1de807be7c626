"""GRPO: episode advantages within groups (multi-turn), and one update on a tiny Llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax.config import ConfigError
from sftrl_jax.data.tokenizer import load_tokenizer
from sftrl_jax.episodes import Turn
from sftrl_jax.models import LlamaConfig, create_model
from sftrl_jax.rl import batching, grpo, ppo
from sftrl_jax.train import optim
from sftrl_jax.train.state import TrainState, rng_data


def ep(*rewards, success=False):
    return [
        Turn(0, 0, k, [1], [2], [0.0], "", r, success and k == len(rewards) - 1, False, [], {})
        for k, r in enumerate(rewards)
    ]


def test_episode_advantages_multi_turn_groups():
    cfg = grpo.GRPOConfig(group_size=2)
    episodes = [ep(-1, 5, success=True), ep(-1, -1, -1), ep(5, success=True), ep(5, success=True)]
    adv = grpo.episode_advantages(episodes, [0, 0, 1, 1], cfg)
    r0 = np.array([4.0, -3.0])
    np.testing.assert_allclose(adv[:2], (r0 - r0.mean()) / (r0.std() + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(adv[2:], 0.0)  # all-equal group
    succ = grpo.episode_advantages(episodes, [0, 0, 1, 1], grpo.GRPOConfig(group_size=2, return_mode="success"))
    assert succ[0] > 0 > succ[1]
    with pytest.raises(ValueError, match="exactly 2 episodes"):
        grpo.episode_advantages(episodes[:3], [0, 0, 1], cfg)
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        grpo.GRPOConfig(group_size=1)


def test_grpo_update_with_reference_kl():
    tok = load_tokenizer()
    config = LlamaConfig.tiny(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32
    )
    model = create_model(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    cfg = grpo.GRPOConfig(group_size=2, samples_per_step=4, micro_batch=2, kl_coef=0.1)
    turns = []
    for i, a in enumerate(["yes", "no", "yes", "no"]):
        ctx = tok.chat_ids([{"role": "user", "content": f"q{i // 2}"}], add_generation_prompt=True)
        resp = tok.encode(a) + [tok.eot_id]
        turns.append(Turn(0, i, 0, ctx, resp, [0.0] * len(resp), a, 0.0, True, False, [], {}))
    batch = batching.build_batch(turns, tok, ppo.PPOConfig(), buckets=(32,))
    from sftrl_jax.sampling.logprobs import token_logprobs

    logp0 = np.asarray(
        token_logprobs(
            nnx.merge(graphdef, params, rest)(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["targets"],
        )
    )
    batch.update(old_token_logp=logp0, ref_token_logp=logp0, advantages=np.array([1, -1, 1, -1], np.float32))
    ocfg = optim.OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant", grad_clip=None)
    tx = optim.make_optimizer(ocfg, params, total_steps=4)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng_data(0))
    step = jax.jit(grpo.make_update_step(graphdef, rest, tx, cfg, lr_fn=optim.schedule(ocfg, 4), temperature=1.0))
    state, m = step(state, batch)
    assert float(m["logprob_gap_max"]) < 1e-5 and float(m["ref_kl"]) == pytest.approx(0.0, abs=1e-7)
    state, m = step(state, batch)
    assert float(m["ref_kl"]) > 0  # the policy moved away from the reference
    new = np.asarray(
        token_logprobs(
            nnx.merge(graphdef, state.params, rest)(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["targets"],
        )
    )
    seq = ((new - logp0) * batch["resp_mask"]).sum(1)
    assert seq[0] > 0 and seq[2] > 0 and seq[1] < 0 and seq[3] < 0, seq

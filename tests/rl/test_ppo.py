"""The PPO update on a tiny Llama + value head: batch layout, ratio == 1 on the first epoch,
the update moves log-probs in the direction of the advantage and values towards the returns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax.data.tokenizer import load_tokenizer
from sftrl_jax.episodes import Turn
from sftrl_jax.models import LlamaConfig, create_model
from sftrl_jax.rl import batching, ppo
from sftrl_jax.rl.value_head import PolicyWithValue, ValueHead
from sftrl_jax.train import optim
from sftrl_jax.train.state import TrainState, rng_data


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def turn(tok, prompt, answer, reward=0.0):
    ctx = tok.chat_ids([{"role": "user", "content": prompt}], add_generation_prompt=True)
    resp = tok.encode(answer) + [tok.eot_id]
    return Turn(0, 0, 0, ctx, resp, [0.0] * len(resp), answer, reward, True, False, [], {})


def test_action_start_finds_the_key(tok):
    resp = tok.encode('{\n  "cards": [1, 2],\n  "formula": "1+2=3",\n}')
    s = batching.action_start(tok, resp, ('"formula"',))
    assert tok.decode(resp[s:]).lstrip().startswith('"formula"') or tok.decode(resp[s:]).startswith('  "formula"')
    assert '"formula"' not in tok.decode(resp[:s])
    assert (
        batching.action_start(tok, tok.encode("no key at all here"), ('"formula"',))
        == len(tok.encode("no key at all here")) - 4
    )


def test_build_batch_layout(tok):
    cfg = ppo.PPOConfig(thought_coef=0.5)
    t = turn(tok, "hi", '{"cards": [1], "formula": "1"}')
    b = batching.build_batch([t], tok, cfg, buckets=(64, 128))
    c, r = len(t.context_ids), len(t.response_ids)
    assert b["input_ids"].shape == (1, 64) and b["value_index"][0] == c - 1
    assert b["resp_mask"][0].sum() == r and b["resp_mask"][0, c - 1] == 1 and b["resp_mask"][0, c + r - 1] == 0
    np.testing.assert_array_equal(b["targets"][0, c - 1 : c + r - 1], t.response_ids)
    assert not b["targets"][0, : c - 1].any() and not b["targets"][0, c + r - 1 :].any()  # prompt/pad: unscored
    w = b["weights"][0, c - 1 : c + r - 1]
    assert set(w.tolist()) == {0.5, 1.0} and w[0] == 0.5 and w[-1] == 1.0


def test_update_moves_logprobs_with_the_advantage(tok):
    config = LlamaConfig.tiny(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32
    )
    model = create_model(config)
    policy = PolicyWithValue(model, ValueHead(64, hidden=(32, 16), rngs=nnx.Rngs(1)))
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    cfg = ppo.PPOConfig(samples_per_step=4, micro_batch=2, value_clip=None)
    T = 0.7  # the run's sampling temperature
    turns = [turn(tok, f"question {i}", ans) for i, ans in enumerate(["good answer", "bad answer"] * 2)]
    batch = batching.build_batch(turns, tok, cfg, buckets=(64,))
    value_fn = jax.jit(ppo.make_value_fn(graphdef, rest, T))
    values, old_logp, tok_logp = value_fn(params, batch)
    batch["old_token_logp"] = np.asarray(tok_logp)  # what the sampler would have returned
    adv = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
    batch.update(
        old_logp=np.asarray(old_logp),
        old_values=np.asarray(values),
        advantages=adv,
        returns=np.full(4, 2.0, np.float32),
    )
    ocfg = optim.OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant", eps=1e-7, grad_clip=None)
    tx = optim.make_optimizer(ocfg, params, total_steps=10)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng_data(0))
    step = jax.jit(ppo.make_update_step(graphdef, rest, tx, cfg, lr_fn=optim.schedule(ocfg, 10), temperature=T))
    state, m = step(state, batch)
    # First epoch: the trainer reproduces the rollout log-probs exactly, so ratio == 1.
    assert float(m["logprob_gap_max"]) < 1e-5
    assert float(m["ratio_mean"]) == pytest.approx(1.0, abs=1e-6) and float(m["clip_frac"]) == 0.0
    assert float(m["policy_loss"]) == pytest.approx(-adv.mean(), abs=1e-6)
    state, m = step(state, batch)
    new_values, new_logp, _ = value_fn(state.params, batch)
    diff = np.asarray(new_logp) - np.asarray(old_logp)
    assert np.all(diff[adv > 0] > 0) and np.all(diff[adv < 0] < 0), diff
    assert np.all(np.abs(np.asarray(new_values) - 2.0) < np.abs(np.asarray(values) - 2.0))


def test_config_refuses_an_unknown_old_logp_source():
    from sftrl_jax.config import ConfigError

    assert ppo.PPOConfig().old_logp == "trainer"
    with pytest.raises(ConfigError, match="ppo.old_logp must be 'trainer' or 'sampler' or 'auto', got 'policy'"):
        ppo.PPOConfig(old_logp="policy")
    from sftrl_jax.rl import grpo

    with pytest.raises(ConfigError, match="grpo.old_logp must be 'trainer' or 'sampler' or 'auto', got 'x'"):
        grpo.GRPOConfig(old_logp="x")
    assert ppo.PPOConfig().reward_mode == "env"
    with pytest.raises(ConfigError, match="ppo.reward_mode must be 'env' or 'success', got 'sum'"):
        ppo.PPOConfig(reward_mode="sum")


def test_kl_to_the_reference_and_entropy_bonus(tok):
    """ppo.kl_coef / ppo.entropy_coef: the k3 KL is 0 while the policy is the reference and grows
    once it moves; the entropy term is the mean next-token entropy over the response tokens."""
    config = LlamaConfig.tiny(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32
    )
    policy = PolicyWithValue(create_model(config), ValueHead(64, hidden=(32, 16), rngs=nnx.Rngs(1)))
    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    cfg = ppo.PPOConfig(samples_per_step=4, micro_batch=2, kl_coef=0.5, entropy_coef=0.01)
    T = 0.7  # the run's sampling temperature
    turns = [turn(tok, f"question {i}", ans) for i, ans in enumerate(["good answer", "bad answer"] * 2)]
    batch = batching.build_batch(turns, tok, cfg, buckets=(64,))
    values, old_logp, tok_logp = jax.jit(ppo.make_value_fn(graphdef, rest, T))(params, batch)
    batch.update(
        old_token_logp=np.asarray(tok_logp),
        old_logp=np.asarray(old_logp),
        old_values=np.asarray(values),
        advantages=np.array([1.0, -1.0, 1.0, -1.0], np.float32),
        returns=np.full(4, 2.0, np.float32),
    )
    # the entropy the step must report: softmax entropy of logits / T at the response positions, float64
    logits = nnx.merge(graphdef, params, rest).model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z = np.asarray(logits, np.float64) / T
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
    want_entropy = (ent * batch["resp_mask"]).sum() / batch["resp_mask"].sum()

    ocfg = optim.OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant", grad_clip=None)
    tx = optim.make_optimizer(ocfg, params, total_steps=10)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng_data(0))
    step = jax.jit(ppo.make_update_step(graphdef, rest, tx, cfg, lr_fn=optim.schedule(ocfg, 10), temperature=T))
    with pytest.raises(ValueError, match="ppo.kl_coef = 0.5 needs the reference's token log-probs"):
        step(state, batch)
    batch["ref_token_logp"] = np.asarray(tok_logp)  # the reference is the starting policy
    state, m = step(state, batch)
    assert float(m["ref_kl"]) == pytest.approx(0.0, abs=1e-9)
    assert float(m["entropy"]) == pytest.approx(want_entropy, rel=1e-5)
    # loss = policy + value_coef * value + kl_coef * KL - entropy_coef * H
    want = float(m["policy_loss"]) + cfg.value_coef * float(m["value_loss"]) - cfg.entropy_coef * want_entropy
    assert float(m["loss"]) == pytest.approx(want, rel=1e-5)
    state, m = step(state, batch)
    assert float(m["ref_kl"]) > 1e-6  # the policy has moved away from the reference


def test_config_refuses_negative_kl_or_entropy_coefficients():
    from sftrl_jax.config import ConfigError
    from sftrl_jax.rl import grpo

    with pytest.raises(ConfigError, match="PPOConfig.kl_coef must be a finite number >= 0, got -0.1"):
        ppo.PPOConfig(kl_coef=-0.1)
    with pytest.raises(ConfigError, match="PPOConfig.entropy_coef must be a finite number >= 0, got nan"):
        ppo.PPOConfig(entropy_coef=float("nan"))
    with pytest.raises(ConfigError, match="GRPOConfig.kl_coef must be a finite number >= 0, got -1"):
        grpo.GRPOConfig(kl_coef=-1)

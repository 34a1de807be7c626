"""KV cache: prefill + one-token decode steps give the full forward's logits (fp32, 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax.models import build, kv_cache
from sftrl_jax.models import config as config_lib
from tests.models import hf_helpers as H

TOL = 1e-5


def _decode(model, batch, prompt_len, max_len):
    """Prefill the first `prompt_len` tokens, then feed the rest one at a time; logits [B, T, V]."""
    graphdef, state = nnx.split(model)

    def step(state, cache, inputs):
        out = nnx.merge(graphdef, state)(**inputs, cache=cache)
        return out.logits, out.hidden_states, out.cache

    step = jax.jit(step, donate_argnums=1)  # the cache is donated: rewritten in place every step
    per_token = ("input_ids", "attention_mask", "cross_attention_mask")
    prefill = {k: (v[:, :prompt_len] if k in per_token else v) for k, v in batch.items()}
    logits, hidden, cache = step(state, model.init_cache(batch["input_ids"].shape[0], max_len), prefill)
    all_logits, all_hidden = [logits], [hidden]
    for t in range(prompt_len, batch["input_ids"].shape[1]):
        inputs = {"input_ids": batch["input_ids"][:, t : t + 1]}
        logits, hidden, cache = step(state, cache, inputs)
        all_logits.append(logits)
        all_hidden.append(hidden)
    return jnp.concatenate(all_logits, 1), jnp.concatenate(all_hidden, 1), cache


def test_llama_prefill_then_decode_matches_full_forward():
    cfg = config_lib.LlamaConfig.tiny()
    model = build.create_model(cfg, seed=1)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.text.vocab_size, (3, 14)))
    mask = np.ones((3, 14), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, :1] = 0
    batch = {"input_ids": ids, "attention_mask": jnp.asarray(mask)}
    full = H.jit_forward(model)(**batch)
    logits, hidden, cache = _decode(model, batch, prompt_len=6, max_len=20)
    real = mask.astype(bool)
    assert H.rel_diff(np.asarray(logits)[real], np.asarray(full.logits)[real]) < TOL
    assert H.rel_diff(np.asarray(hidden)[real], np.asarray(full.hidden_states)[real]) < TOL
    assert int(cache.index) == 14
    np.testing.assert_array_equal(cache.next_position, mask.sum(1))
    np.testing.assert_array_equal(cache.key_mask[:, :14], mask.astype(bool))
    assert not cache.key_mask[:, 14:].any()


def test_mllama_prefill_with_images_then_decode():
    cfg = config_lib.MllamaConfig.tiny()
    model = build.create_model(cfg, seed=2)
    batch = {k: jnp.asarray(v) for k, v in H.image_batch(cfg, images=2).items()}
    # tokens after the prompt see what the last prompt token saw (as transformers' generate does)
    prompt_len = 8
    last = batch["cross_attention_mask"][:, prompt_len - 1 : prompt_len]
    xmask = batch["cross_attention_mask"].at[:, prompt_len:].set(jnp.broadcast_to(last, (2, 4, 2, 4)))
    batch["cross_attention_mask"] = xmask
    full = H.jit_forward(model)(**batch)
    logits, _, cache = _decode(model, batch, prompt_len=prompt_len, max_len=16)
    real = np.asarray(batch["attention_mask"]).astype(bool)
    assert H.rel_diff(np.asarray(logits)[real], np.asarray(full.logits)[real]) < TOL
    assert cache.has_cross and len(cache.cross_k) == len(cfg.text.cross_attention_layers)
    assert cache.cross_k[0].shape == (2, 2 * 4 * cfg.vision.num_patches, cfg.text.num_kv_heads, cfg.text.head_dim)


def test_precomputed_vision_states_give_the_same_logits():
    cfg = config_lib.MllamaConfig.tiny()
    model = build.create_model(cfg, seed=2)
    batch = {k: jnp.asarray(v) for k, v in H.image_batch(cfg, images=1).items()}
    states = model.vision_states(
        batch.pop("pixel_values"), batch.pop("aspect_ratio_ids"), batch.pop("aspect_ratio_mask")
    )
    assert states.shape == (2, cfg.vision.max_num_tiles * cfg.vision.num_patches, cfg.text.hidden_size)
    full = model(**{k: jnp.asarray(v) for k, v in H.image_batch(cfg, images=1).items()}).logits
    np.testing.assert_array_equal(model(**batch, cross_attention_states=states).logits, full)


def test_text_only_mllama_cache_skips_cross_layers():
    cfg = config_lib.MllamaConfig.tiny()
    model = build.create_model(cfg, seed=3)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 9)))
    full = H.jit_forward(model)(ids)
    logits, _, cache = _decode(model, {"input_ids": ids}, prompt_len=5, max_len=9)
    assert H.rel_diff(logits, full.logits) < TOL
    assert not cache.has_cross and len(cache.k) == cfg.text.num_layers - 2


def test_cache_overflow_is_an_error():
    cfg = config_lib.LlamaConfig.tiny()
    model = build.create_model(cfg)
    cache = model.init_cache(1, 4)
    with pytest.raises(ValueError, match="do not fit a cache of max_length 4"):
        model(jnp.zeros((1, 5), jnp.int32), cache=cache)
    cache = model(jnp.zeros((1, 3), jnp.int32), cache=cache).cache
    with pytest.raises(ValueError, match="cache full: 3 tokens written"):
        model(jnp.zeros((1, 2), jnp.int32), cache=cache)


def test_cache_write_and_init_shapes():
    cfg = config_lib.LlamaConfig.tiny()
    cache = kv_cache.init_cache(cfg.text, 2, 8, jnp.bfloat16)
    assert cache.k[0].shape == (2, 8, cfg.text.num_kv_heads, cfg.text.head_dim) and cache.k[0].dtype == jnp.bfloat16
    buf = kv_cache.write(jnp.zeros((1, 5, 1)), jnp.ones((1, 2, 1)), jnp.int32(3))
    np.testing.assert_array_equal(buf[0, :, 0], [0, 0, 0, 1, 1])


def test_bf16_compute_keeps_fp32_logits():
    cfg = config_lib.LlamaConfig.tiny()
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 8)))
    ref = H.jit_forward(build.create_model(cfg, seed=4))(ids)
    out = H.jit_forward(build.create_model(cfg, seed=4, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16))(ids)
    assert out.logits.dtype == jnp.float32  # log-softmax inputs stay fp32
    assert out.hidden_states.dtype == jnp.bfloat16
    assert H.rel_diff(out.logits, ref.logits) < 3e-2


def test_remat_gives_the_same_gradients():
    cfg = config_lib.LlamaConfig.tiny()
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 8)))

    def loss(model):
        logp = jax.nn.log_softmax(model(ids).logits)
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1))

    grads = [jax.jit(nnx.grad(loss))(build.create_model(cfg, seed=4, remat=r)) for r in (False, True)]
    leaves = [jax.tree.leaves(g) for g in grads]
    assert max(H.rel_diff(a, b) for a, b in zip(*leaves)) < 1e-5

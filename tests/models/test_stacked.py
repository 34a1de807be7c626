"""Layer stacks stored stacked (`scan_layers=True`): the per-layer model's logits in the training
forward and its tokens and log-probs in cached greedy generation (fp32, 1e-5); the stacked layout
(shapes, the `layers` logical name, the cache); HF -> stacked -> HF bit for bit; model checkpoints
of either layout load into either."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import sampling
from sftrl_jax.models import build, checkpoint, convert, kv_cache, safetensors_io, stacking
from sftrl_jax.models import config as config_lib
from sftrl_jax.parallel import make_mesh
from sftrl_jax.sampling import sampler
from tests.models import hf_helpers as H
from tests.sampling.helpers import peaked_model
from tests.sampling.test_sampler import image_inputs

TOL = 1e-5
LLAMA, MLLAMA = config_lib.LlamaConfig.tiny(num_layers=3), config_lib.MllamaConfig.tiny()


def stacked_twin(model, cfg, **kw):
    """`model` (per layer) as a model built with `scan_layers`, holding the same weights."""
    graphdef, target = nnx.split(build.abstract_model(cfg, scan_layers=True, **kw))
    return nnx.merge(graphdef, stacking.relayout(nnx.state(model), target))


def _names(var) -> tuple:
    return tuple(var.get_metadata()["out_sharding"])


def _equal_params(a, b) -> None:
    a, b = build.flat_params(nnx.state(a, nnx.Param)), build.flat_params(nnx.state(b, nnx.Param))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]), err_msg=k)


def test_stacked_parameters_carry_the_layer_axis():
    model = build.create_model(MLLAMA, seed=0, scan_layers=True)
    flat = build.flat_params(nnx.state(model))
    assert not [k for k in flat if ".layers." in k]
    lm = model.language_model
    assert len(lm.stacks) == 2  # cross_attention_layers (1, 3) of 4: (self, cross) twice
    q = flat["language_model.stacks.1.cross_attn.q_proj"]
    assert q.shape == (2, 64, 4, 16) and _names(q) == ("layers", "embed", "heads", "head_dim")
    gate = flat["language_model.stacks.1.cross_attn_attn_gate"]
    assert gate.shape == (2, 1) and _names(gate) == ("layers", None)
    norm = flat["language_model.stacks.0.input_layernorm.scale"]
    assert norm.shape == (2, 64) and _names(norm) == ("layers", "embed")
    assert flat["vision_model.transformer.stacks.0.mlp.fc1.kernel"].shape == (4, 32, 64)
    assert flat["vision_model.global_transformer.stacks.0.gate_ffn"].shape == (2, 1)
    assert flat["language_model.embed_tokens"].shape == (264, 64)  # outside the stacks: as before
    # same parameters, same count
    assert sum(v.size for v in flat.values()) == build.param_count(MLLAMA) == 265291

    # 11B (abstract): 8 groups of (self, self, self, cross, self); 32 local and 8 global vision layers
    big = build.abstract_model(config_lib.MllamaConfig.llama_3_2_11b_vision(), scan_layers=True)
    flat = build.flat_params(nnx.state(big))
    assert len(big.language_model.stacks) == 5
    assert flat["language_model.stacks.3.cross_attn.k_proj"].shape == (8, 4096, 8, 128)
    assert flat["language_model.stacks.4.mlp.down_proj"].shape == (8, 14336, 4096)
    assert flat["vision_model.transformer.stacks.0.self_attn.q_proj"].shape == (32, 1280, 16, 80)
    assert flat["vision_model.global_transformer.stacks.0.self_attn.q_proj"].shape == (8, 1280, 16, 80)
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 10_670_220_835

    # the KV cache follows: one [G, B, S, K, H] buffer per self-attention stack
    cache = model.init_cache(3, 8)
    assert len(cache.k) == 1 and cache.k[0].shape == (2, 3, 8, 2, 16)
    assert kv_cache.logical_names(cache).k[0] == ("layers", "batch", "seq", "act_kv_heads", None)


def test_stacked_parameters_shard_like_their_layers(n_devices):
    if n_devices < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = make_mesh("data=1,fsdp=4,tensor=2")
    model = build.create_model(LLAMA, seed=0, mesh=mesh, scan_layers=True)
    up = model.model.stacks[0].mlp.up_proj[...]  # [G, D, F]: layers replicated, D over fsdp, F over tensor
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (3, 16, 64)


@pytest.mark.parametrize("cfg", [LLAMA, MLLAMA], ids=["llama", "mllama"])
def test_stacked_forward_equals_per_layer(cfg):
    model = build.create_model(cfg, seed=4)
    twin = stacked_twin(model, cfg)
    if isinstance(cfg, config_lib.MllamaConfig):
        batches = [{k: jnp.asarray(v) for k, v in H.image_batch(cfg, seed=1).items()}]
        batches.append({k: batches[0][k] for k in ("input_ids", "attention_mask")})  # text only
    else:
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 10)))
        batches = [{"input_ids": ids, "attention_mask": jnp.ones((2, 10), jnp.int32).at[1, :3].set(0)}]
    for batch in batches:
        ours, ref = H.jit_forward(twin)(**batch), H.jit_forward(model)(**batch)
        assert H.rel_diff(ours.logits, ref.logits) < TOL
        assert H.rel_diff(ours.hidden_states, ref.hidden_states) < TOL


@pytest.mark.parametrize("cfg", [LLAMA, MLLAMA], ids=["llama", "mllama"])
def test_stacked_greedy_generation_equals_per_layer(cfg):
    """Prefill and decode through the scanned layers with the stacked cache: the same tokens and
    log-probs as the per-layer model (text and, for Mllama, images)."""
    model = peaked_model(cfg, seed=5)
    twin = stacked_twin(model, cfg)
    runs = [([[1, 5, 9, 22, 7], [1, 7], [3, 4, 5, 6, 7, 8, 9, 10]], {})]
    if isinstance(cfg, config_lib.MllamaConfig):
        runs.append(image_inputs(cfg))
    for prompts, images in runs:
        ref = sampling.generate(model, prompts, max_new_tokens=6, temperature=0.0, **images)
        ours = sampling.generate(twin, prompts, max_new_tokens=6, temperature=0.0, **images)
        np.testing.assert_array_equal(ours.tokens, ref.tokens)
        np.testing.assert_array_equal(ours.lengths, ref.lengths)
        np.testing.assert_allclose(ours.logprobs_raw, ref.logprobs_raw, rtol=0, atol=TOL)


def test_sampler_keeps_stacked_norms_and_gates_in_their_dtype():
    """`prepare_weights` casts matrices to the compute dtype; a stack's [G, D] norm scales and [G, 1]
    gates are not matrices (the per-layer model keeps them fp32 too)."""
    model = build.create_model(MLLAMA, seed=0, scan_layers=True)
    graphdef, params = nnx.split(model)
    prepared = build.flat_params(sampler.prepare_weights(params, jnp.bfloat16))
    assert prepared["language_model.stacks.0.input_layernorm.scale"].dtype == jnp.float32
    assert prepared["language_model.stacks.1.cross_attn_mlp_gate"].dtype == jnp.float32
    assert prepared["language_model.stacks.0.mlp.up_proj"].dtype == jnp.bfloat16


def test_checkpoints_load_across_layouts(tmp_path):
    """An old per-layer checkpoint loads into a stacked model and a stacked one into a per-layer
    model, bit for bit, sharded on a mesh."""
    per_layer = build.create_model(MLLAMA, seed=6)
    stacked = stacked_twin(per_layer, MLLAMA)
    checkpoint.save_checkpoint(per_layer, str(tmp_path / "per_layer"))
    checkpoint.save_checkpoint(stacked, str(tmp_path / "stacked"))
    mesh = make_mesh("data=1,fsdp=-1,tensor=1")
    for path in ("per_layer", "stacked"):
        for scan, want in ((True, stacked), (False, per_layer)):
            loaded = checkpoint.load_checkpoint(str(tmp_path / path), scan_layers=scan, mesh=mesh)
            assert loaded.language_model.scan_layers == scan
            _equal_params(loaded, want)


@pytest.mark.hf
def test_hf_to_stacked_to_hf_bit_for_bit(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    hf = H.save_hf(H.hf_model(MLLAMA, seed=7), str(tmp_path / "hf"))
    stacked = convert.from_pretrained(hf, scan_layers=True)
    assert stacked.vision_model.transformer.stacks[0].self_attn.q_proj.shape[0] == 4
    _equal_params(stacked, stacked_twin(convert.from_pretrained(hf), MLLAMA))
    out = str(tmp_path / "out")
    convert.save_pretrained(stacked, out)

    def tensors(folder):
        files, weight_map = safetensors_io.open_folder(folder)
        return {k: np.array(files[f].get(k)) for k, f in weight_map.items()}

    original, written = tensors(hf), tensors(out)
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)

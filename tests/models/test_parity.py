"""Parity with transformers on tiny random models (every gate non-zero), per module and end to end.

Tolerance: fp32 logits within 1e-4 of the largest logit (max |ours - hf| / max |hf|). Our model
runs with transformers' semantics flags here (`MllamaConfig.with_transformers_semantics`).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sftrl_jax import kernels, ops
from sftrl_jax.models import config as config_lib
from sftrl_jax.models import convert, text
from tests.models import hf_helpers as H

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf
TOL = 1e-4
# Every path of the ops seam that runs here: the CPU default (XLA laid out for XLA:CPU, causal
# attention in blocks), the native kernels of one-CPU-device steps, and the plain XLA reference
# (the XLA path every backend falls back to).
PATHS = {
    "cpu": None,
    "cpu-kernels": ops.Policy(platform="cpu", cpu_kernels=True),
    "xla-reference": ops.Policy(reference=True),
}


def _torch(batch):
    return {k: torch.tensor(v) for k, v in batch.items()}


def _jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    """(our config, HF model, our model loaded from the HF folder)."""
    cfg = config_lib.MllamaConfig.tiny()
    hf = H.hf_model(cfg, seed=1)
    path = H.save_hf(hf, str(tmp_path_factory.mktemp("mllama")))
    ours = convert.from_pretrained(path, config=cfg.with_transformers_semantics())
    return cfg, hf, ours


def _hf_logits(hf, batch):
    pos = H.positions(batch["attention_mask"])
    with torch.no_grad():
        return hf(**_torch(batch), position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("gqa-llama3-rope", {}),
        ("mha-default-rope", dict(num_kv_heads=4, rope_type="default")),
        ("tied-head_dim-32", dict(tie_word_embeddings=True, head_dim=32, num_heads=2, num_kv_heads=1)),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_llama_end_to_end(tmp_path, name, overrides, path):
    if path == "cpu-kernels" and not kernels.gemm_available():
        pytest.skip("no CPU kernels here")
    policy = PATHS[path]
    cfg = config_lib.LlamaConfig.tiny(**overrides)
    hf = H.hf_model(cfg)
    ours = convert.from_pretrained(H.save_hf(hf, str(tmp_path)))
    rng = np.random.default_rng(0)
    # 150 tokens: the self-attention runs in causal blocks of 64, 64 and 22 query rows.
    t = 150
    assert ops.cpu.causal_block(t) < t
    batch = dict(input_ids=rng.integers(0, cfg.text.vocab_size, (2, t)), attention_mask=np.ones((2, t), np.int64))
    batch["attention_mask"][1, :70] = 0  # left padding beyond the first block
    ref = _hf_logits(hf, batch)
    got = np.asarray(H.jit_forward(ours, policy)(**_jnp(batch)).logits)
    real = batch["attention_mask"].astype(bool)
    assert H.rel_diff(got[real], ref[real]) < TOL
    # positions far beyond original_max_position exercise every band of the llama3 frequency scaling
    pos = np.arange(t)[None].repeat(2, 0) * 17 + 3
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch["input_ids"]), position_ids=torch.tensor(pos)).logits.numpy()
    forward = H.jit_forward(ours, policy)
    got = np.asarray(forward(jnp.asarray(batch["input_ids"]), position_ids=jnp.asarray(pos)).logits)
    assert H.rel_diff(got, ref) < TOL


def test_mllama_text_only(mllama):
    cfg, hf, ours = mllama
    batch = H.image_batch(cfg)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ref = _hf_logits(hf, batch)
    out = H.jit_forward(ours)(**_jnp(batch))
    real = batch["attention_mask"].astype(bool)
    assert H.rel_diff(np.asarray(out.logits)[real], ref[real]) < TOL
    assert out.hidden_states.shape == (2, 12, cfg.text.hidden_size)


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("path", ["cpu", "xla-reference"])
def test_mllama_with_images(mllama, images, path):
    cfg, hf, ours = mllama
    batch = H.image_batch(cfg, images=images, seed=images)
    ref = _hf_logits(hf, batch)
    got = np.asarray(H.jit_forward(ours, PATHS[path])(**_jnp(batch)).logits)
    real = batch["attention_mask"].astype(bool)
    assert H.rel_diff(got[real], ref[real]) < TOL
    # the images matter: text-only logits differ from 3 on (row 0 sees image 0 from token 2)
    text_only = np.asarray(
        ours(jnp.asarray(batch["input_ids"]), attention_mask=jnp.asarray(batch["attention_mask"])).logits
    )
    assert np.abs(text_only[0, 2:] - got[0, 2:]).max() > 1e-2


def test_vision_encoder(mllama):
    cfg, hf, ours = mllama
    batch = H.image_batch(cfg, images=2)
    args = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    with torch.no_grad():
        ref = hf.model.vision_model(**{k: torch.tensor(batch[k]) for k in args}).last_hidden_state.numpy()
    got = np.asarray(ours.vision_model(*(jnp.asarray(batch[k]) for k in args)))
    assert got.shape == ref.shape == (2, 2, 4, cfg.vision.num_patches, cfg.vision.output_dim)
    assert H.rel_diff(got, ref) < TOL


def test_self_attention_layer(mllama):
    cfg, hf, ours = mllama
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 10, cfg.text.hidden_size)).astype(np.float32)
    pos = np.arange(10)[None].repeat(2, 0) + np.array([[0], [40]])
    causal = np.tril(np.ones((10, 10), bool))
    with torch.no_grad():
        hf_text = hf.model.language_model
        emb = hf_text.rotary_emb(torch.tensor(x), position_ids=torch.tensor(pos))
        bias = torch.tensor(np.where(causal, 0.0, np.finfo(np.float32).min)[None, None], dtype=torch.float32)
        ref = hf_text.layers[0](torch.tensor(x), attention_mask=bias, position_embeddings=emb)
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    mask = jnp.asarray(np.broadcast_to(causal, (2, 10, 10)))
    layer = ours.language_model.layers[0]
    rope = ops.rope_cos_sin(jnp.asarray(pos), layer.self_attn.inv_freq)
    got, _ = layer(jnp.asarray(x), rope=rope, mask=mask)
    assert H.rel_diff(got, ref) < TOL


def test_cross_attention_layer(mllama):
    import transformers.models.mllama.modeling_mllama as hf_mllama

    cfg, hf, ours = mllama
    rng = np.random.default_rng(4)
    b, t, i, c, p = 2, 6, 2, cfg.vision.max_num_tiles, cfg.vision.num_patches
    x = rng.standard_normal((b, t, cfg.text.hidden_size)).astype(np.float32)
    states = rng.standard_normal((b, i * c * p, cfg.text.hidden_size)).astype(np.float32)
    tiles = (rng.random((b, t, i, c)) < 0.5).astype(np.int64)
    tiles[0, :2] = 0  # rows that see no tile
    with torch.no_grad():
        xmask, rows = hf_mllama._prepare_cross_attention_mask(
            torch.tensor(tiles), num_vision_tokens=p, dtype=torch.float32
        )
        ref = hf.model.language_model.layers[1](
            torch.tensor(x),
            cross_attention_states=torch.tensor(states),
            cross_attention_mask=xmask,
            attention_mask=None,
            full_text_row_masked_out_mask=rows,
        )
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    layer = ours.language_model.layers[1]
    key_mask, row_mask = text._cross_masks(jnp.asarray(tiles), i * c * p)
    got = layer(jnp.asarray(x), kv=layer.cross_attn.kv(jnp.asarray(states)), mask=key_mask, row_mask=row_mask)
    assert H.rel_diff(got, ref) < TOL


def test_meta_semantics_differ_where_documented(mllama, tmp_path):
    """Default (Meta) flags: rows before the first image ignore the image entirely, so their logits
    equal the text-only ones; transformers' semantics let them attend to it."""
    cfg, hf, _ = mllama
    path = H.save_hf(hf, str(tmp_path))
    meta = convert.from_pretrained(path)
    hf_sem = convert.from_pretrained(path, config=cfg.with_transformers_semantics())
    batch = _jnp(H.image_batch(cfg, images=2))
    text_args = dict(attention_mask=batch["attention_mask"])
    for model, same in ((meta, True), (hf_sem, False)):
        forward = H.jit_forward(model)
        with_images = np.asarray(forward(**batch).logits)
        text_only = np.asarray(forward(batch["input_ids"], **text_args).logits)
        diff = np.abs(with_images[0, :2] - text_only[0, :2]).max()
        assert (diff < 1e-6) if same else (diff > 1e-3)
    # intermediate features: "input" of layer i == "output" of layer i - 1
    shifted = dataclasses.replace(cfg.vision, intermediate_layer_features="output", intermediate_layers_indices=(0, 2))
    meta_shifted = convert.from_pretrained(path, config=dataclasses.replace(cfg, vision=shifted))
    args = (batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    np.testing.assert_allclose(meta.vision_model(*args), meta_shifted.vision_model(*args), rtol=1e-6, atol=1e-6)

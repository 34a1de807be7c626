"""Qwen2.5 parity with transformers' `Qwen2ForCausalLM` on tiny random twins (fp32, 1e-4 of the largest
logit): tied and untied heads, GQA, head_dim != D/N, on every ops path that runs here, with the layers
per layer and stacked (`scan_layers`). The q/k/v biases are set large enough that leaving them out
fails the comparison."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import kernels, models, ops
from sftrl_jax.models import build
from sftrl_jax.models import config as config_lib
from tests.models import hf_helpers as H
from tests.models.test_parity import PATHS

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf
TOL = 1e-4
CONFIGS = {
    "gqa-tied": {},
    "untied-head_dim-32-g4": dict(tie_word_embeddings=False, head_dim=32, num_kv_heads=1),
}


def hf_qwen(config: config_lib.Qwen2Config, seed: int = 0):
    """A randomised transformers `Qwen2ForCausalLM` (fp32, eager attention) for `config`: q/k biases
    O(1) (Qwen2.5's are large), v biases 0.3, so that they move the logits well beyond the tolerance;
    a tied head's embeddings at std 0.1 (at 0.5 the embedding dominates the residual and greedy
    decoding repeats the last token: the layers would not be tested)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config.from_dict(config_lib.to_hf_dict(config))
    cfg._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    H.randomize_(model, seed)
    scale = {"q_proj.bias": 10.0, "k_proj.bias": 10.0, "v_proj.bias": 3.0}
    if config.text.tie_word_embeddings:
        scale["embed_tokens.weight"] = 0.2
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(scale.get(".".join(name.split(".")[-2:]), 1.0))
    return model


def hf_folder(config: config_lib.Qwen2Config, path: str, seed: int = 0):
    """(the transformers twin, the folder it saved to)."""
    hf = hf_qwen(config, seed)
    return hf, H.save_hf(hf, path)


@pytest.fixture(scope="module", params=list(CONFIGS))
def twin(request, tmp_path_factory):
    """(config, HF model, its folder) per config."""
    cfg = config_lib.Qwen2Config.tiny(**CONFIGS[request.param])
    hf, path = hf_folder(cfg, str(tmp_path_factory.mktemp(request.param)), seed=len(request.param))
    return cfg, hf, path


@pytest.mark.parametrize("scan_layers", [False, True], ids=["per-layer", "stacked"])
@pytest.mark.parametrize("path", PATHS)
def test_qwen_end_to_end(twin, path, scan_layers):
    if path == "cpu-kernels" and not kernels.gemm_available():
        pytest.skip("no CPU kernels here")
    cfg, hf, folder = twin
    ours = models.from_pretrained(folder, scan_layers=scan_layers)
    assert type(ours) is models.Qwen2ForCausalLM and ours.model.scan_layers == scan_layers
    rng = np.random.default_rng(0)
    t = 150  # the CPU path's causal attention runs in blocks of 64, 64 and 22 query rows
    assert ops.cpu.causal_block(t) < t
    batch = dict(input_ids=rng.integers(0, cfg.text.vocab_size, (2, t)), attention_mask=np.ones((2, t), np.int64))
    batch["attention_mask"][1, :70] = 0  # left padding beyond the first block
    pos = H.positions(batch["attention_mask"])
    with torch.no_grad():
        inputs = {k: torch.tensor(v) for k, v in batch.items()}
        ref = hf(**inputs, position_ids=torch.tensor(pos)).logits.numpy()
    forward = H.jit_forward(ours, PATHS[path])
    got = np.asarray(forward(**{k: jnp.asarray(v) for k, v in batch.items()}).logits)
    real = batch["attention_mask"].astype(bool)
    assert H.rel_diff(got[real], ref[real]) < TOL
    # large positions: theta 1e6 over the whole head dim
    pos = np.arange(t)[None].repeat(2, 0) * 97 + 5
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch["input_ids"]), position_ids=torch.tensor(pos)).logits.numpy()
    got = np.asarray(forward(jnp.asarray(batch["input_ids"]), position_ids=jnp.asarray(pos)).logits)
    assert H.rel_diff(got, ref) < TOL


def test_qwen_biases_matter(twin):
    """Without its q/k/v biases the model is far from transformers': the comparison above sees them."""
    cfg, hf, folder = twin
    ours = models.from_pretrained(folder)
    ids = np.random.default_rng(1).integers(0, cfg.text.vocab_size, (2, 20))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert H.rel_diff(H.jit_forward(ours)(jnp.asarray(ids)).logits, ref) < TOL
    state = nnx.state(ours, nnx.Param)
    zeroed = build.map_params(state, lambda p, v: jnp.zeros_like(v[...]) if p.endswith("_bias") else v[...])
    nnx.update(ours, zeroed)
    assert H.rel_diff(H.jit_forward(ours)(jnp.asarray(ids)).logits, ref) > 1e-2


def test_qwen_one_layer(twin):
    """One decoder layer against transformers' (bias, RoPE theta 1e6, GQA), positions far apart."""
    cfg, hf, folder = twin
    ours = models.from_pretrained(folder)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 10, cfg.text.hidden_size)).astype(np.float32)
    pos = np.arange(10)[None].repeat(2, 0) + np.array([[0], [4000]])
    causal = np.tril(np.ones((10, 10), bool))
    with torch.no_grad():
        emb = hf.model.rotary_emb(torch.tensor(x), position_ids=torch.tensor(pos))
        bias = torch.tensor(np.where(causal, 0.0, np.finfo(np.float32).min)[None, None], dtype=torch.float32)
        ref = hf.model.layers[0](torch.tensor(x), attention_mask=bias, position_embeddings=emb)
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    layer = ours.model.layers[0]
    rope = ops.rope_cos_sin(jnp.asarray(pos), layer.self_attn.inv_freq)
    got, _ = layer(jnp.asarray(x), rope=rope, mask=jnp.asarray(np.broadcast_to(causal, (2, 10, 10))))
    assert H.rel_diff(got, ref) < TOL

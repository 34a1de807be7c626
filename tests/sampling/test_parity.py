"""Greedy tokens equal transformers' greedy `generate` (KV cache on) on tiny Llama and Mllama twins
with identical weights (every gate non-zero): ragged batches, text and image prompts, a stop token."""

import numpy as np
import pytest

from sftrl_jax import sampling
from sftrl_jax.data import processor
from sftrl_jax.models import config as config_lib
from sftrl_jax.models import convert
from tests.models import hf_helpers as H
from tests.sampling.test_sampler import image_inputs

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf
M = 10


def _hf_greedy(hf, prompt, *, eos=None, **images):
    """transformers' greedy generate for one unpadded prompt -> the new tokens (stop token included)."""
    inputs = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
    inputs.update({k: torch.tensor(v) for k, v in images.items()})
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=M, do_sample=False, eos_token_id=eos, pad_token_id=0)
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def _twin(config, tmp_path, seed):
    hf = H.hf_model(config, seed=seed)
    ours_config = config.with_transformers_semantics() if isinstance(config, config_lib.MllamaConfig) else None
    return hf, convert.from_pretrained(H.save_hf(hf, str(tmp_path)), config=ours_config)


def check_text_greedy(hf, ours):
    """A ragged batch of text prompts: greedy tokens equal transformers', also with a per-row stop
    token (the first token row 1 produces after its 3rd). Returns our unstopped result."""
    prompts = [[1, 5, 9, 22, 7], [1, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    result = sampling.generate(ours, prompts, max_new_tokens=M, temperature=0.0)
    for b, p in enumerate(prompts):
        assert result.tokens[b].tolist() == _hf_greedy(hf, p)
    eos = int(result.tokens[1, 3])
    stopped = sampling.generate(ours, prompts, max_new_tokens=M, temperature=0.0, stop_tokens=(eos,))
    assert stopped.lengths[1] <= 4
    for b, p in enumerate(prompts):
        assert stopped.responses()[b] == _hf_greedy(hf, p, eos=eos)
    return result


def test_llama_greedy_equals_transformers(tmp_path):
    check_text_greedy(*_twin(config_lib.LlamaConfig.tiny(), tmp_path, seed=3))


def test_mllama_greedy_equals_transformers_text_and_images(tmp_path):
    cfg = config_lib.MllamaConfig.tiny()
    hf, ours = _twin(cfg, tmp_path, seed=4)
    # text only (the cross-attention layers are skipped on both sides)
    prompts = [[1, 5, 9, 22, 7, 40, 41], [1, 7, 3]]
    result = sampling.generate(ours, prompts, max_new_tokens=M, temperature=0.0)
    for b, p in enumerate(prompts):
        assert result.tokens[b].tolist() == _hf_greedy(hf, p)
    # images: a ragged batch, tiles 2x2 and 1x2, the image token after some text
    prompts, images = image_inputs(cfg)
    result = sampling.generate(ours, prompts, max_new_tokens=M, temperature=0.0, **images)
    n_tiles = np.asarray(images["aspect_ratio_mask"]).sum(-1)
    for b, p in enumerate(prompts):
        row = {k: v[b : b + 1] for k, v in images.items()}
        xmask = processor.cross_attention_mask(
            p, cfg.image_token_index, num_tiles=list(n_tiles[b]), max_tiles=cfg.vision.max_num_tiles, length=len(p)
        )
        assert result.tokens[b].tolist() == _hf_greedy(hf, p, cross_attention_mask=xmask[None], **row)
    text_only = sampling.generate(
        ours, [[t for t in p if t != cfg.image_token_index] for p in prompts], max_new_tokens=M, temperature=0.0
    )
    assert np.any(text_only.tokens != result.tokens)  # the images changed the generation

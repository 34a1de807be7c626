"""Tiny transformers models built in-process from our configs, with every gate non-zero."""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from sftrl_jax.models import config as config_lib


def rel_diff(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def hf_config(config: config_lib.ModelConfig):
    import transformers

    d = config_lib.to_hf_dict(config)
    cls = transformers.MllamaConfig if isinstance(config, config_lib.MllamaConfig) else transformers.LlamaConfig
    return cls.from_dict(d)


def randomize_(model, seed: int = 0) -> None:
    """Weights at a scale where every path matters: O(1) activations, tanh gates far from 0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "gate" in leaf and p.ndim == 1:
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0)
                p.copy_(sign * (0.4 + torch.rand(p.shape, generator=g)))
            elif "norm" in name and leaf == "weight":
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 or "embedding" in name or "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def hf_model(config: config_lib.ModelConfig, seed: int = 0):
    """A randomised transformers model (fp32, eager attention) for `config`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(config)
    cfg._attn_implementation = "eager"
    if isinstance(config, config_lib.MllamaConfig):
        model = transformers.MllamaForConditionalGeneration(cfg)
    else:
        model = transformers.LlamaForCausalLM(cfg)
    model.eval()
    randomize_(model, seed)
    return model


def save_hf(model, path: str) -> str:
    model.save_pretrained(path)
    return path


def image_batch(config: config_lib.MllamaConfig, *, seed: int = 0, seq: int = 12, images: int = 2):
    """Inputs with several aspect ratios, padding tiles, a padding image and text rows before the
    first image (numpy, HF names)."""
    rng = np.random.default_rng(seed)
    v = config.vision
    b, c = 2, v.max_num_tiles
    ratios = [list(r) for r in v.supported_aspect_ratios]
    if images == 1:
        ar = [[ratios.index([2, 2]) + 1], [ratios.index([2, 1]) + 1]]
    else:
        ar = [[ratios.index([1, 1]) + 1, ratios.index([2, 2]) + 1], [ratios.index([1, 2]) + 1, 0]]
    ar_ids = np.array(ar, np.int64)
    ar_mask = np.zeros((b, images, c), np.int64)
    for bi in range(b):
        for ii in range(images):
            n_tiles = int(np.prod(ratios[ar_ids[bi, ii] - 1])) if ar_ids[bi, ii] else 1
            ar_mask[bi, ii, :n_tiles] = 1
    px = rng.standard_normal((b, images, c, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    px *= ar_mask[..., None, None, None]
    ids = rng.integers(3, config.text.vocab_size, (b, seq))
    xmask = np.zeros((b, seq, images, c), np.int64)
    # row 0: text before the first image (rows 0-1 see nothing), image 0 from 2, both from 5.
    ids[0, 2] = config.image_token_index
    xmask[0, 2:, 0] = ar_mask[0, 0]
    if images == 2:
        ids[0, 5] = config.image_token_index
        xmask[0, 5:, 1] = ar_mask[0, 1]
    # row 1: left-padded by 2, image at the first real token.
    ids[1, :2] = config.text.pad_token_id
    ids[1, 2] = config.image_token_index
    xmask[1, 2:, 0] = ar_mask[1, 0]
    attn = np.ones((b, seq), np.int64)
    attn[1, :2] = 0
    return dict(
        input_ids=ids,
        attention_mask=attn,
        pixel_values=px,
        aspect_ratio_ids=ar_ids,
        aspect_ratio_mask=ar_mask,
        cross_attention_mask=xmask,
    )


def positions(attention_mask: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(attention_mask, -1) - 1, 0)


def write_config(config_dict: dict, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_dict, f)
    return folder


def jit_forward(model, policy=None):
    """`model(**inputs)` compiled once per input shapes (eager op-by-op dispatch is slow on CPU),
    traced under the ops `policy` (None: the platform default)."""
    import jax
    from flax import nnx

    from sftrl_jax import ops

    graphdef, state = nnx.split(model)

    @jax.jit
    @functools.partial(ops.traced_with, policy=policy)
    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    return lambda input_ids, **inputs: forward(state, {"input_ids": input_ids, **inputs})

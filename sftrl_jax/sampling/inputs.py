"""Host side of the sampler: checking the request, bucketing lengths, left padding, image arrays.

Every problem a caller can cause is a `UserError` naming the prompt, token, array or shape at fault.
Shapes are bucketed so a stream of requests compiles a bounded number of programs: prompt lengths
round up to a power of two (at least 16) up to 256, then to a multiple of 128; batch sizes round up
to a power of two and to a multiple of the devices the batch is split over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sftrl_jax.data import rows
from sftrl_jax.errors import UserError
from sftrl_jax.models import config as config_lib
from sftrl_jax.models import logprobs as model_logprobs


def prompt_bucket(n: int) -> int:
    """Padded prompt length: 16, 32, 64, 128, 256, then multiples of 128."""
    if n <= 256:
        return max(16, 1 << max(n - 1, 0).bit_length())
    return -(-n // 128) * 128


def batch_bucket(n: int, multiple: int = 1) -> int:
    """Padded batch size: the next power of two, rounded up to a multiple of `multiple`."""
    b = 1 << max(n - 1, 0).bit_length()
    return -(-b // multiple) * multiple


def check_prompts(prompts: Sequence[Sequence[int]], num_embeddings: int) -> list[list[int]]:
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise UserError("prompts must be a non-empty list of token-id lists")
    out = []
    for b, p in enumerate(prompts):
        ids = [int(t) for t in np.asarray(p).reshape(-1)] if not isinstance(p, str) else None
        if ids is None:
            raise UserError(f"prompt {b} is a string; pass token ids (tokenize it first)")
        if not ids:
            raise UserError(f"prompt {b} is empty: every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < num_embeddings]
        if bad:
            raise UserError(f"prompt {b} has token id {bad[0]} outside the model's {num_embeddings} embeddings")
        out.append(ids)
    return out


def check_stop_tokens(stop_tokens: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    out = tuple(int(t) for t in stop_tokens)
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
        raise UserError(f"stop token {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return out


def check_method(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> None:
    if int(max_new_tokens) < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 <= temperature < math.inf:
        raise UserError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if int(top_k) < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")


def check_cache_length(lengths: Sequence[int], prompt_len: int, max_new_tokens: int, max_length: int) -> None:
    """The cache holds the padded prompt and every generated token but the last."""
    need = prompt_len + max_new_tokens - 1
    if need > max_length:
        b = int(np.argmax(lengths))
        raise UserError(
            f"prompt {b} has {lengths[b]} tokens (padded to {prompt_len}); with max_new_tokens={max_new_tokens} "
            f"the KV cache needs {need} slots, more than max_length={max_length}"
        )


def left_pad(prompts: list[list[int]], *, batch: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] ids and attention mask, prompts right-aligned; extra rows hold one pad token."""
    starts = [length - len(p) for p in prompts]
    ids = rows.place(prompts, starts, length=length, fill=pad_id, batch=batch)
    mask = rows.place([[1] * len(p) for p in prompts], starts, length=length, batch=batch)
    mask[len(prompts) :, -1] = 1  # padding rows: a single (ignored) token keeps their softmax finite
    return ids, mask


def image_arrays(
    config: config_lib.ModelConfig,
    prompts: list[list[int]],
    *,
    batch: int,
    length: int,
    pixel_values: Any,
    aspect_ratio_ids: Any,
    aspect_ratio_mask: Any,
    cross_attention_mask: Sequence[Any] | None,
) -> dict[str, np.ndarray]:
    """Checked, batch- and length-padded Mllama inputs; {} for text-only requests.

    `cross_attention_mask`, if given, is one [len(prompt_b), I, C] array per prompt; by default it is
    derived from the `<|image|>` tokens and each image's tile count (as transformers' processor does).
    """
    pixels = dict(zip(model_logprobs.PIXEL_KEYS, (pixel_values, aspect_ratio_ids, aspect_ratio_mask)))
    given = {k: v for k, v in pixels.items() if v is not None}
    is_mllama = isinstance(config, config_lib.MllamaConfig)
    if not given:
        if cross_attention_mask is not None:
            raise UserError("cross_attention_mask was given without pixel_values")
        if is_mllama:
            with_images = [b for b, p in enumerate(prompts) if config.image_token_index in p]
            if with_images:
                raise UserError(f"prompt {with_images[0]} has <|image|> tokens but no pixel_values were given")
        return {}
    if not is_mllama:
        raise UserError(f"image inputs were given but the model ({config.architecture}) has no vision tower")
    missing = [k for k in model_logprobs.PIXEL_KEYS if k not in given]
    if missing:
        raise UserError(f"pixel_values need aspect_ratio_ids and aspect_ratio_mask too; missing {missing}")
    v = config.vision
    px = np.asarray(pixel_values, np.float32)
    n = len(prompts)
    if (
        px.ndim != 6
        or px.shape[0] != n
        or px.shape[2:] != (v.max_num_tiles, v.num_channels, v.image_size, v.image_size)
    ):
        raise UserError(
            f"pixel_values has shape {px.shape}; expected [B={n}, I, C={v.max_num_tiles}, {v.num_channels}, "
            f"{v.image_size}, {v.image_size}]"
        )
    images = px.shape[1]
    ar_ids = np.asarray(aspect_ratio_ids)
    ar_mask = np.asarray(aspect_ratio_mask)
    if ar_ids.shape != (n, images):
        raise UserError(f"aspect_ratio_ids has shape {ar_ids.shape}; expected [B, I] = {(n, images)}")
    if ar_mask.shape != (n, images, v.max_num_tiles):
        raise UserError(
            f"aspect_ratio_mask has shape {ar_mask.shape}; expected [B, I, C] = {(n, images, v.max_num_tiles)}"
        )
    if ar_ids.min() < 0 or ar_ids.max() > len(v.supported_aspect_ratios):
        raise UserError(f"aspect_ratio_ids must be in [0, {len(v.supported_aspect_ratios)}], got {ar_ids.max()}")

    if cross_attention_mask is not None:
        if len(cross_attention_mask) != n:
            raise UserError(f"cross_attention_mask has {len(cross_attention_mask)} entries for {n} prompts")
        masks = [np.asarray(m) for m in cross_attention_mask]
        for b, (p, m) in enumerate(zip(prompts, masks)):
            if m.shape != (len(p), images, v.max_num_tiles):
                raise UserError(
                    f"cross_attention_mask[{b}] has shape {m.shape}; expected [len(prompt)={len(p)}, I={images}, "
                    f"C={v.max_num_tiles}]"
                )
        xmask = rows.place(masks, [length - len(p) for p in prompts], length=length, batch=batch)
    else:
        counts = [p.count(config.image_token_index) for p in prompts]
        for b, k in enumerate(counts):
            if k > images:
                raise UserError(f"prompt {b} has {k} <|image|> tokens but pixel_values holds {images} images")
            if (ar_ids[b, :k] == 0).any():
                raise UserError(f"prompt {b} has {k} <|image|> tokens but fewer real images (aspect_ratio_ids 0)")
        tiles = ar_mask.astype(bool).sum(-1)  # [B, I]
        xmask = rows.cross_attention_mask(
            prompts,
            [tiles[b, :k] for b, k in enumerate(counts)],
            image_token_id=config.image_token_index,
            max_tiles=v.max_num_tiles,
            images=images,
            length=length,
            left_padded=True,
            batch=batch,
        )
    pad = batch - n
    pad_mask = np.zeros((pad, *ar_mask.shape[1:]), ar_mask.dtype)
    pad_mask[..., 0] = 1  # a padding image has one (blank) tile, as transformers' processor marks it
    return {
        "pixel_values": np.concatenate([px, np.zeros((pad, *px.shape[1:]), np.float32)]),
        "aspect_ratio_ids": np.concatenate([ar_ids, np.zeros((pad, images), ar_ids.dtype)]).astype(np.int32),
        "aspect_ratio_mask": np.concatenate([ar_mask, pad_mask]).astype(np.int32),
        "cross_attention_mask": xmask,
    }

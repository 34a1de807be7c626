"""The one batch builder: token rows laid out in [B, T] arrays, and the Mllama image inputs of rows.

    batch = rows.right_padded(seqs, length=T, pad_id=pad_id)        # input_ids, attention_mask [B, T]
    batch["targets"] = rows.place([s[1:] for s in seqs], [0] * B, length=T)  # the next token
    batch |= rows.image_inputs(seqs, images, image_processor=proc, image_token_id=tok.image_token_id, length=T)

Users: SFT data (`sft.collate`), RL batches (`rl.batching.build_batch`), the teacher-forced log-probs
(`sampling.logprobs`, right padded) and the sampler's prompts (`sampling.inputs`, left padded). A
per-token row (targets, loss or response masks, weights, log-probs) goes through `place` at the
positions that predict its tokens: position t - 1 predicts token t. The image arrays are named by
`models.logprobs.IMAGE_KEYS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sftrl_jax.data import processor


def place(
    rows: Sequence[Any],
    starts: Sequence[int],
    *,
    length: int,
    dtype=np.int32,
    fill=0,
    batch: int | None = None,
) -> np.ndarray:
    """[batch, length, ...] array of `fill`, with row b's values at positions [starts[b], starts[b] +
    len(rows[b])). A row may carry trailing axes (a [n, I, C] mask); `batch` (default len(rows)) adds
    rows of `fill` after them."""
    trailing = np.shape(rows[0])[1:] if len(rows) else ()
    out = np.full((len(rows) if batch is None else batch, length, *trailing), fill, dtype)
    for b, (row, start) in enumerate(zip(rows, starts)):
        out[b, start : start + len(row)] = row
    return out


def right_padded(seqs: Sequence[Sequence[int]], *, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """`input_ids` [B, T] (`pad_id` after each sequence) and `attention_mask` [B, T] (1 on its tokens)."""
    starts = [0] * len(seqs)
    return {
        "input_ids": place(seqs, starts, length=length, fill=pad_id),
        "attention_mask": place([[1] * len(s) for s in seqs], starts, length=length),
    }


def cross_attention_mask(
    seqs: Sequence[Sequence[int]],
    num_tiles: Sequence[Sequence[int]],
    *,
    image_token_id: int,
    max_tiles: int,
    images: int,
    length: int,
    left_padded: bool = False,
    batch: int | None = None,
) -> np.ndarray:
    """[batch, T, I, C] int32: `processor.cross_attention_mask` of each row (num_tiles[b]: the tile
    count of each of its images). Right padded rows run to T (the padding after the last image group
    sees it); left padded rows end at T and have none before their first token."""
    masks = [
        processor.cross_attention_mask(
            s,
            image_token_id,
            num_tiles=list(tiles),
            max_tiles=max_tiles,
            length=len(s) if left_padded else length,
            max_images=images,
        )
        for s, tiles in zip(seqs, num_tiles)
    ]
    starts = [length - len(s) if left_padded else 0 for s in seqs]
    return place(masks, starts, length=length, batch=batch)


def image_inputs(
    seqs: Sequence[Sequence[int]],
    images: Sequence[Sequence[Any]],
    *,
    image_processor: processor.ImageProcessor,
    image_token_id: int,
    length: int,
    max_images: int = 1,
) -> dict[str, np.ndarray]:
    """The Mllama inputs of right padded rows whose images[b] (PIL) are their `<|image|>` tokens' images,
    in order: `pixel_values` [B, I, C, 3, H, W], `aspect_ratio_ids` [B, I], `aspect_ratio_mask`
    [B, I, C] (the processor's, at least `max_images` slots) and `cross_attention_mask` [B, T, I, C]."""
    arrays = image_processor(images, max_images=max_images)
    num_tiles = arrays.pop("num_tiles")
    arrays["cross_attention_mask"] = cross_attention_mask(
        seqs,
        [num_tiles[b, : len(imgs)] for b, imgs in enumerate(images)],
        image_token_id=image_token_id,
        max_tiles=image_processor.max_tiles,
        images=arrays["pixel_values"].shape[1],
        length=length,
    )
    return arrays

"""Image inputs for Mllama: tiles via transformers' image processor, and the cross-attention mask.

    proc = ImageProcessor(tile_size=560, max_tiles=4)
    arrays = proc([[img_a], [img_b]])          # pixel_values [B, I, C, 3, H, W], aspect_ratio_*...
    mask = cross_attention_mask(ids, image_token_id, num_tiles=[2], max_tiles=4, length=T)  # [T, I, C]

Which text tokens see which image follows transformers' `MllamaProcessor`: an image's tokens start
at its `<|image|>` token and run to the next image token (or to the end of the sequence);
consecutive image tokens form a group that sees to the end of the group's span. Tokens added later
(generation, later turns) see the last image group, since its span runs to the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sftrl_jax.errors import UserError


class ImageProcessor:
    """PIL images -> Mllama tile arrays (numpy), with the tile size and tile count of the vision config."""

    def __init__(self, *, tile_size: int = 560, max_tiles: int = 4):
        from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

        self.tile_size = tile_size
        self.max_tiles = max_tiles
        self._proc = MllamaImageProcessorPil(size={"height": tile_size, "width": tile_size}, max_image_tiles=max_tiles)

    def __call__(self, images: Sequence[Sequence[Any]], *, max_images: int | None = None) -> dict[str, np.ndarray]:
        """`images[b]` = the images of example b (PIL). Returns pixel_values [B, I, C, 3, H, W] (fp32),
        aspect_ratio_ids [B, I], aspect_ratio_mask [B, I, C] and num_tiles [B, I] (0 = padding image)."""
        batch = [list(imgs) for imgs in images]
        n_images = max([len(b) for b in batch] + [max_images or 0])
        if n_images == 0:
            raise UserError("ImageProcessor got no images")
        B, C, S = len(batch), self.max_tiles, self.tile_size
        pixel_values = np.zeros((B, n_images, C, 3, S, S), np.float32)
        ar_ids = np.zeros((B, n_images), np.int32)
        ar_mask = np.zeros((B, n_images, C), np.int32)
        num_tiles = np.zeros((B, n_images), np.int32)
        rows = [b for b in range(B) if batch[b]]
        if rows:
            out = self._proc([[_rgb(im) for im in batch[b]] for b in rows], return_tensors="np")
            for j, b in enumerate(rows):
                k = len(batch[b])
                pixel_values[b, :k] = out["pixel_values"][j, :k]
                ar_ids[b, :k] = out["aspect_ratio_ids"][j, :k]
                ar_mask[b, :k] = out["aspect_ratio_mask"][j, :k]
                num_tiles[b, :k] = out["num_tiles"][j][:k]
        return {
            "pixel_values": pixel_values,
            "aspect_ratio_ids": ar_ids,
            "aspect_ratio_mask": ar_mask,
            "num_tiles": num_tiles,
        }


def for_model(model) -> ImageProcessor | None:
    """The image processor matching a model's vision config (tile size, tiles); None for text models."""
    vision = getattr(model.config, "vision", None)
    if vision is None:
        return None
    return ImageProcessor(tile_size=vision.image_size, max_tiles=vision.max_num_tiles)


def _rgb(image: Any) -> Any:
    if isinstance(image, np.ndarray):
        from PIL import Image

        image = Image.fromarray(image)
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def image_token_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """[(start, end)] token span of each image (end exclusive; -1 = to the end of the sequence)."""
    locs = [i for i, t in enumerate(ids) if t == image_token_id]
    if not locs:
        return []
    spans = [[a, b] for a, b in zip(locs[:-1], locs[1:])] + [[locs[-1], -1]]
    # Consecutive image tokens share the span of the last one in their group.
    for i in range(len(spans) - 2, -1, -1):
        if spans[i][1] == spans[i][0] + 1:
            spans[i][1] = spans[i + 1][1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(
    ids: Sequence[int],
    image_token_id: int,
    *,
    num_tiles: Sequence[int],
    max_tiles: int,
    length: int,
    max_images: int | None = None,
) -> np.ndarray:
    """[length, I, C] int32: 1 where text position t may attend to tile c of image i."""
    spans = image_token_spans(ids, image_token_id)
    if len(spans) != len(num_tiles):
        raise UserError(f"the text has {len(spans)} <|image|> tokens but {len(num_tiles)} images were given")
    n_images = max(len(spans), max_images or 0)
    mask = np.zeros((length, n_images, max_tiles), np.int32)
    for i, ((start, end), tiles) in enumerate(zip(spans, num_tiles)):
        end = length if end == -1 else min(end, length)
        mask[start:end, i, :tiles] = 1
    return mask

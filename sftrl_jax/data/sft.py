"""SFT data: the reference conversation JSON -> padded, bucketed, resumable grain batches.

    data = SFTData(cfg, tokenizer, image_processor=None)
    it = data.iterator()                     # grain DatasetIterator; it.get_state() / set_state()
    batch = next(it)                         # dict of numpy arrays, see `collate`

Files: one JSON array (the paper's release) or JSONL, of `{"image"?: path, "conversations": [...]}`.
Loss on assistant tokens only. Sequences longer than `max_length` are truncated (counted in
`stats`); lengths are padded up to the smallest bucket that fits, so the train step compiles once
per bucket. With several processes each reads only its own rows of every global batch, so the
batches are those of a 1-process run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from sftrl_jax.config import ConfigError, check_ranges
from sftrl_jax.data import conversations, rows
from sftrl_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    image_dir: str | None = None  # relative `image` paths resolve here (default: the JSON file's folder)
    max_length: int = 1024  # tokens; longer examples are truncated and counted
    buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)  # padded lengths (<= max_length are used)
    batch_size: int = 8  # global batch (split over processes)
    shuffle: bool = True
    seed: int = 0
    epochs: int | None = None  # None = repeat forever
    max_images: int = 1  # image slots per example (static shapes)
    skip_bad_lines: bool = False  # JSONL: skip malformed lines (counted, reported) instead of failing

    def __post_init__(self):
        check_ranges(
            self,
            max_length="[1, 1048576]",  # 2**20 tokens: far past any context we train
            buckets="[1, 1048576]",
            batch_size="[1, inf)",
            seed="[0, inf)",
            epochs="[1, inf)",
            max_images="[1, inf)",
        )
        if list(self.buckets) != sorted(self.buckets) or any(b <= 0 for b in self.buckets):
            raise ConfigError(f"data.buckets must be increasing positive lengths, got {list(self.buckets)}")


def read_examples(path: str | os.PathLike, *, skip_bad_lines: bool = False) -> list[dict[str, Any]]:
    """A JSON array or JSONL file of reference-format examples (checked on read).

    A malformed JSONL line is an error naming the file and line, or, with `skip_bad_lines`, skipped
    and reported (with its line number) on stderr.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"SFT data file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    where: list[str] = []
    if text.lstrip().startswith("["):
        try:
            examples = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"SFT data file {path!r} is not valid JSON: {e}") from None
        where = [f"{path}[{i}]" for i in range(len(examples))]
    else:
        examples, skipped = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                examples.append(json.loads(line))
                where.append(f"{path}:{n}")
            except json.JSONDecodeError as e:
                if not skip_bad_lines:
                    raise UserError(
                        f"{path}:{n}: not valid JSON ({e}); set data.skip_bad_lines=true to skip such lines"
                    ) from None
                skipped.append(n)
        if skipped:
            print(f"sft data: skipped {len(skipped)} malformed lines of {path}: {skipped[:20]}", file=sys.stderr)
    if not isinstance(examples, list):
        raise UserError(f"SFT data file {path!r}: expected a JSON array of examples")
    for ex, w in zip(examples, where):
        if not isinstance(ex, dict):
            raise UserError(f"{w}: an example must be a JSON object, got {type(ex).__name__}")
        conversations.to_messages(ex, where=w)  # validates
        if not any(t["from"] in ("gpt", "assistant") for t in ex["conversations"]):
            raise UserError(f"{w}: no assistant ('gpt') turn to learn from")
    return examples


def bucket_length(n: int, buckets: Sequence[int], max_length: int) -> int:
    return next((b for b in buckets if n <= b <= max_length), max_length)


class Tokenize:
    """One example -> ids, loss mask (shifted to targets), image list; counts truncations."""

    def __init__(self, tokenizer, *, max_length: int, image_root: str | None, image_dir: str | None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_root = image_dir or image_root

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        messages = conversations.to_messages(example)
        ids, mask = self.tokenizer.encode_conversation(messages)
        truncated = len(ids) > self.max_length
        ids, mask = ids[: self.max_length], mask[: self.max_length]
        images = [self._image_path(example["image"])] if example.get("image") else []
        return {"ids": ids, "mask": mask, "truncated": truncated, "images": images}

    def _image_path(self, rel: str) -> str:
        path = rel if os.path.isabs(rel) or self.image_root is None else os.path.join(self.image_root, rel)
        if not os.path.exists(path):
            raise UserError(f"SFT image {path!r} does not exist (from 'image': {rel!r}; set data.image_dir)")
        return path


def collate(
    examples: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    buckets: Sequence[int],
    max_length: int,
    tokenizer=None,
    image_processor=None,
    max_images: int = 1,
) -> dict[str, np.ndarray]:
    """Right-padded batch. `input_ids`, `attention_mask` [B, T]; `targets` [B, T] (next token) and
    `loss_mask` [B, T] (1 where the target is an assistant token). With an image processor also
    `pixel_values` [B, I, C, 3, H, W], `aspect_ratio_ids` [B, I], `aspect_ratio_mask` [B, I, C],
    `cross_attention_mask` [B, T, I, C]."""
    T = bucket_length(max(len(r["ids"]) for r in examples), buckets, max_length)
    seqs = [r["ids"] for r in examples]
    starts = [0] * len(examples)
    batch = rows.right_padded(seqs, length=T, pad_id=pad_id)
    batch["targets"] = rows.place([s[1:] for s in seqs], starts, length=T, fill=pad_id)
    batch["loss_mask"] = rows.place([r["mask"][1:] for r in examples], starts, length=T, dtype=np.float32)
    batch["truncated"] = np.array([r["truncated"] for r in examples], bool)
    if image_processor is not None:
        from PIL import Image

        images = [[Image.open(p).convert("RGB") for p in r["images"]] for r in examples]
        batch |= rows.image_inputs(
            seqs,
            images,
            image_processor=image_processor,
            image_token_id=tokenizer.image_token_id,
            length=T,
            max_images=max_images,
        )
    return batch


class SFTData:
    """Grain pipelines over SFT files: shuffle, repeat, per-process slice, tokenise, bucket-pad."""

    def __init__(self, cfg: SFTDataConfig, tokenizer, *, image_processor=None):
        if not cfg.train_files:
            raise ConfigError("data.train_files is empty: give at least one SFT JSON file")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.train = self._load(cfg.train_files)
        self.eval = self._load(cfg.eval_files) if cfg.eval_files else []
        has_images = any(ex.get("image") for ex, _ in self.train)
        if has_images and image_processor is None:
            raise UserError("the SFT data has images but the model has no vision tower (or no image processor)")

    def _load(self, files: Sequence[str]) -> list[tuple[dict[str, Any], str]]:
        out = []
        for f in files:
            root = os.path.dirname(os.path.abspath(f))
            out.extend((ex, root) for ex in read_examples(f, skip_bad_lines=self.cfg.skip_bad_lines))
        return out

    def _dataset(self, examples, *, train: bool, batch_size: int):
        import grain
        import jax

        cfg = self.cfg
        ds = grain.MapDataset.source(examples)
        if train and cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)
        if train:
            ds = ds.repeat(cfg.epochs)
        P = jax.process_count()
        if P > 1:
            # Global batch i is elements [i*G, (i+1)*G) of the shuffled stream, exactly as in a
            # 1-process run; process p reads only its rows [i*G + p*L, i*G + (p+1)*L).
            G, L, p, full = batch_size * P, batch_size, jax.process_index(), ds
            ds = grain.MapDataset.range(len(full) // P).map(lambda j: full[(j // L) * G + p * L + j % L])
        tokenizers = {}

        def tokenize(item):
            ex, root = item
            if root not in tokenizers:
                tokenizers[root] = Tokenize(
                    self.tokenizer, max_length=cfg.max_length, image_root=root, image_dir=cfg.image_dir
                )
            return tokenizers[root](ex)

        return ds.map(tokenize).batch(
            batch_size,
            drop_remainder=train,
            batch_fn=lambda examples: collate(
                examples,
                pad_id=self.tokenizer.pad_id,
                buckets=cfg.buckets,
                max_length=cfg.max_length,
                tokenizer=self.tokenizer,
                image_processor=self.image_processor,
                max_images=cfg.max_images,
            ),
        )

    def per_process_batch(self) -> int:
        import jax

        if self.cfg.batch_size % jax.process_count():
            raise ConfigError(
                f"data.batch_size {self.cfg.batch_size} is not divisible by {jax.process_count()} processes"
            )
        return self.cfg.batch_size // jax.process_count()

    def iterator(self):
        """The training iterator (repeats per `epochs`); resumable with get_state()/set_state()."""
        return iter(self._dataset(self.train, train=True, batch_size=self.per_process_batch()).to_iter_dataset())

    def eval_batches(self):
        """One pass over the eval files (last batch may be smaller)."""
        if not self.eval:
            return iter(())
        return iter(self._dataset(self.eval, train=False, batch_size=self.per_process_batch()))

    def __len__(self) -> int:
        return len(self.train)

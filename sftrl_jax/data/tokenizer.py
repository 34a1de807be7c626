"""A thin wrapper over any Llama-3-style Hugging Face tokenizer (the shipped small one or a real one).

    tok = load_tokenizer()                      # the small BPE tokenizer shipped for CPU runs
    tok = load_tokenizer("/ckpts/Llama-3.2-11B-Vision-Instruct")
    ids = tok.chat_ids([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids, mask = tok.encode_conversation(messages)   # mask = 1 on assistant tokens (loss targets)

Messages are `{"role": "system"|"user"|"assistant", "content": str | [{"type": "image"} |
{"type": "text", "text": str}]}` as in transformers' chat templates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from typing import Any

from sftrl_jax import integrity
from sftrl_jax.errors import UserError

Message = dict[str, Any]

# Llama 3 special tokens, in Llama's order; `<|image|>` comes last as in Llama 3.2 Vision (id 128256).
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def default_tokenizer_path() -> str:
    """The small BPE tokenizer stored in the package (built by `tools/make_tokenizer.py`)."""
    return str(resources.files("sftrl_jax.data") / "assets" / "tokenizer")


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Loads a tokenizer folder (tokenizer.json + tokenizer_config.json); None = the shipped one."""
    from transformers import AutoTokenizer

    path = os.fspath(path) if path is not None else default_tokenizer_path()
    if not os.path.isdir(path):
        raise UserError(f"tokenizer folder {path!r} does not exist")
    integrity.verify_folder(path)  # the shipped one is its recorded bytes
    try:
        hf = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path!r}: {e}") from None
    return Tokenizer(hf, path=path)


class Tokenizer:
    """Token ids of chats, stop tokens and assistant-only loss masks over a HF tokenizer."""

    def __init__(self, hf: Any, *, path: str | None = None):
        self.hf = hf
        self.path = path
        if getattr(hf, "chat_template", None) is None:
            raise UserError(f"tokenizer {path or hf.name_or_path!r} has no chat template")
        vocab = hf.get_vocab()
        missing = [
            t for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>") if t not in vocab
        ]
        if missing:
            raise UserError(f"tokenizer {path or hf.name_or_path!r} lacks the Llama-3 special tokens {missing}")
        self.bos_id: int = vocab["<|begin_of_text|>"]
        self.eot_id: int = vocab["<|eot_id|>"]
        self.image_token_id: int | None = vocab.get("<|image|>")
        self.stop_ids: tuple[int, ...] = tuple(vocab[t] for t in STOP_TOKENS if t in vocab)
        pad = vocab.get("<|finetune_right_pad_id|>")
        self.pad_id: int = pad if pad is not None else (hf.pad_token_id if hf.pad_token_id is not None else self.eot_id)

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding needs at least this many rows)."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no BOS added (special-token strings in `text` map to their ids)."""
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
        return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.chat_text(messages, add_generation_prompt=add_generation_prompt))

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Ids of the whole chat and a mask that is 1 on assistant tokens (their content and end token).

        An assistant message with `"loss": False` is context only (mask 0). The header
        `<|start_header_id|>assistant<|end_header_id|>\\n\\n` is prompt (mask 0): at inference it is what
        `add_generation_prompt` appends.
        """
        messages = list(messages)
        ids = self.chat_ids(messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("loss", True) is False:
                continue
            start = len(self.chat_ids(messages[:i], add_generation_prompt=True))
            end = len(self.chat_ids(messages[: i + 1]))
            if ids[:end] != self.chat_ids(messages[: i + 1]) or start > end:
                raise UserError(
                    "the chat template does not render conversation prefixes as prefixes; "
                    "cannot place the assistant loss mask"
                )
            mask[start:end] = [1] * (end - start)
        return ids, mask

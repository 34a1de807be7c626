"""A thin wrapper over a Hugging Face chat tokenizer of the Llama-3 or the ChatML (Qwen2.5) family.

    tok = load_tokenizer()                      # the small Llama-3 BPE tokenizer shipped for CPU runs
    tok = load_tokenizer(default_tokenizer_path("chatml"))  # its ChatML twin (Qwen2.5-Instruct's format)
    tok = load_tokenizer("/ckpts/Llama-3.2-11B-Vision-Instruct")  # or "/ckpts/Qwen2.5-7B-Instruct"
    ids = tok.chat_ids([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids, mask = tok.encode_conversation(messages)   # mask = 1 on assistant tokens (loss targets)

Messages are `{"role": "system"|"user"|"assistant", "content": str | [{"type": "image"} |
{"type": "text", "text": str}]}` as in transformers' chat templates.

The family is read from the vocabulary (`CHAT_FORMATS`); the folder's own chat template renders
every chat, the wrapper only knows which special token does what:

- llama3: `eot_id` `<|eot_id|>`; `stop_ids` it, `<|eom_id|>`, `<|end_of_text|>`; `pad_id`
  `<|finetune_right_pad_id|>`; `bos_id` `<|begin_of_text|>`; `image_token_id` `<|image|>` (if any).
- chatml: `eot_id` `<|im_end|>`; `stop_ids` it, `<|endoftext|>` (Qwen2.5-Instruct's generation eos);
  `pad_id` `<|endoftext|>`; `bos_id` None (no BOS: nothing uses `bos_id` but tests); `image_token_id`
  None (text only).

(`pad_id` falls back to the tokenizer's pad token, then `eot_id`.) Qwen2.5-Instruct's template writes
each turn as `<|im_start|>{role}\\n{content}<|im_end|>\\n`, puts its default system message ("You are
Qwen, created by Alibaba Cloud. ...") first when the chat has none, and its generation prompt is
`<|im_start|>assistant\\n`. The loss mask of an assistant turn is its content and `<|im_end|>`. The
header `<|im_start|>assistant\\n` is not a target: it is what the generation prompt puts in the
context. Nor is the "\\n" after `<|im_end|>`: it is never generated (sampling stops at `<|im_end|>`, a
stop id, and the next turn's context gets the "\\n" from the template), so an SFT model learns exactly
the tokens an RL rollout samples (`response_ids` end at the stop id), and no loss goes to a token the
template fixes. Content must be text when the tokenizer has no image token (ChatML, a text-only
Llama): an image item is refused; for ChatML a list of text items is joined into one string (Qwen2.5's
template concatenates `content` as a string).
"""

from __future__ import annotations

import dataclasses
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

# Qwen2.5's special tokens in Qwen's order (ids 151643...); its non-special added tokens (`<tool_call>`,
# the fill-in-the-middle ones) are not listed: nothing here uses them.
CHATML_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Qwen2.5-Instruct's generation_config eos_token_id: [<|im_end|>, <|endoftext|>]
CHATML_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """What the special tokens of one chat family are for (token strings; ids come from the vocab)."""

    name: str
    required: tuple[str, ...]  # all in the vocabulary = this family
    eot: str  # ends every turn: the last target of an assistant turn and the first stop token
    stop: tuple[str, ...]  # generation stops at any of these that the vocabulary has
    pad: str | None  # the pad token when the vocabulary has it
    bos: str | None  # what the template starts a chat with (None: nothing)
    image: str | None  # the image placeholder (None: a text-only family)
    special_tokens: tuple[str, ...]  # the special tokens of the shipped small tokenizer, in id order


LLAMA3 = ChatFormat(
    name="llama3",
    required=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    eot="<|eot_id|>",
    stop=STOP_TOKENS,
    pad="<|finetune_right_pad_id|>",
    bos="<|begin_of_text|>",
    image="<|image|>",
    special_tokens=SPECIAL_TOKENS,
)
CHATML = ChatFormat(
    name="chatml",
    required=("<|im_start|>", "<|im_end|>"),
    eot="<|im_end|>",
    stop=CHATML_STOP_TOKENS,
    pad="<|endoftext|>",
    bos=None,
    image=None,
    special_tokens=CHATML_SPECIAL_TOKENS,
)
CHAT_FORMATS = {f.name: f for f in (LLAMA3, CHATML)}  # tried in this order


def default_tokenizer_path(family: str = "llama3") -> str:
    """The small BPE tokenizer of `family` stored in the package (built by `tools/make_tokenizer.py`):
    "llama3" (assets/tokenizer) or "chatml" (assets/tokenizer_chatml, Qwen2.5-Instruct's format)."""
    folders = {"llama3": "tokenizer", "chatml": "tokenizer_chatml"}
    if family not in folders:
        raise UserError(f"no shipped tokenizer of family {family!r}; valid: {', '.join(folders)}")
    return str(resources.files("sftrl_jax.data") / "assets" / folders[family])


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


def chat_format_of(vocab: dict[str, int], *, where: str) -> ChatFormat:
    """The first family whose required tokens are all in `vocab`; else a UserError naming `where` and
    what each family lacks."""
    missing = {}
    for fmt in CHAT_FORMATS.values():
        missing[fmt.name] = [t for t in fmt.required if t not in vocab]
        if not missing[fmt.name]:
            return fmt
    raise UserError(
        f"tokenizer {where!r} is neither Llama-3-style (lacks the special tokens {missing['llama3']}) nor ChatML "
        f"(lacks {missing['chatml']})"
    )


class Tokenizer:
    """Token ids of chats, stop tokens and assistant-only loss masks over a HF tokenizer."""

    def __init__(self, hf: Any, *, path: str | None = None):
        self.hf = hf
        self.path = path
        where = path or hf.name_or_path
        if getattr(hf, "chat_template", None) is None:
            raise UserError(f"tokenizer {where!r} has no chat template")
        vocab = hf.get_vocab()
        self.chat_format: ChatFormat = chat_format_of(vocab, where=where)
        fmt = self.chat_format
        self.bos_id: int | None = vocab[fmt.bos] if fmt.bos is not None else None
        self.eot_id: int = vocab[fmt.eot]
        self.image_token_id: int | None = vocab.get(fmt.image) if fmt.image is not None else None
        self.stop_ids: tuple[int, ...] = tuple(vocab[t] for t in fmt.stop if t in vocab)
        pad = vocab.get(fmt.pad) if fmt.pad is not None else None
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
        messages = [self._renderable(m) for m in messages]
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.chat_text(messages, add_generation_prompt=add_generation_prompt))

    def _renderable(self, message: Message) -> Message:
        """The message as this family's template takes it (see the module docstring)."""
        content = message.get("content")
        if not isinstance(content, list):
            return message
        if self.image_token_id is None and any(item.get("type") == "image" for item in content):
            raise UserError(
                f"tokenizer {self.path or self.hf.name_or_path!r} has no image token: a {message.get('role')} "
                "message carries an image, which a text-only model cannot take"
            )
        if self.chat_format is CHATML:
            return {**message, "content": "".join(item.get("text", "") for item in content)}
        return message

    def encode_conversation(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """Ids of the whole chat and a mask that is 1 on assistant tokens (their content and end token).

        An assistant message with `"loss": False` is context only (mask 0). The header
        (`<|start_header_id|>assistant<|end_header_id|>\\n\\n`, `<|im_start|>assistant\\n`) is prompt
        (mask 0): at inference it is what `add_generation_prompt` appends. So is whatever the template
        writes after the turn's end token (ChatML's "\\n"): generation stops at that token. Each
        assistant turn of a multi-turn chat (a revision: failed try, feedback, answer) is placed by
        rendering the chat up to it, so every turn gets exactly its own tokens.
        """
        messages = list(messages)
        ids = self.chat_ids(messages)
        mask = [0] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or message.get("loss", True) is False:
                continue
            if i == 0:
                raise UserError("the conversation starts with an assistant turn: a target needs a prompt before it")
            prompt = self.chat_ids(messages[:i], add_generation_prompt=True)
            upto = self.chat_ids(messages[: i + 1])
            start = len(prompt)
            end = len(upto) - upto[::-1].index(self.eot_id) if self.eot_id in upto[start:] else -1
            if ids[:start] != prompt or ids[: len(upto)] != upto or end < start:
                raise UserError(
                    "the chat template does not render conversation prefixes as prefixes (or an assistant "
                    f"turn without its end token {self.hf.convert_ids_to_tokens(self.eot_id)!r}); cannot place "
                    "the assistant loss mask"
                )
            mask[start:end] = [1] * (end - start)
        return ids, mask

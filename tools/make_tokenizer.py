"""Builds the small byte-level BPE tokenizers shipped for CPU runs: a Llama-3 one
(sftrl_jax/data/assets/tokenizer) and a Qwen2.5-style ChatML one (sftrl_jax/data/assets/tokenizer_chatml).

    .venv/bin/python tools/make_tokenizer.py [--family llama3|chatml|both] [--vocab 2048] [--out DIR]

Both are trained on the same text, the text the environments generate (prompts of every split,
expert answers, verifier feedback) plus a little generic English, so any text still encodes (byte
fallback). Digits are split one per token, which helps tiny models learn arithmetic (Qwen2.5 splits
them so too). The special tokens follow the learned vocabulary:

- llama3: the Llama-3 special tokens, `<|image|>` last as in Llama 3.2 Vision; the chat template is
  `sftrl_jax/data/chat_template.jinja`; pre-tokenizer GPT-2's byte-level regex.
- chatml: Qwen2.5's special tokens in Qwen's order (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
  then the vision/box ones; the tool-call and fill-in-the-middle added tokens are left out), Qwen2's
  pre-tokenizer (NFC, its split regex, byte-level), and a tokenizer_config.json laid out as
  Qwen2.5-Instruct's (`Qwen2Tokenizer`, eos `<|im_end|>`, pad `<|endoftext|>`, no BOS) whose
  `chat_template` is `sftrl_jax/data/chat_template_chatml.jinja` (Qwen2.5-Instruct's, tool calls left
  out). It is what a Qwen2.5-Instruct folder gives the wrapper, in 2048 tokens.

Each folder gets the sha256 record `sftrl_jax.integrity` checks at every load. The build is
deterministic: rerunning it rewrites the same bytes. Loadable with `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sftrl_jax import integrity  # noqa: E402
from sftrl_jax.data import tokenizer as tok_lib  # noqa: E402
from sftrl_jax.envs import make  # noqa: E402

GENERIC = """The quick brown fox jumps over the lazy dog. You are a helpful assistant.
Please answer the question. I cannot do that. Here is the answer in the requested format.
Sure! Let me think step by step. First, second, third, then, finally. Yes, no, maybe.
Python code: def f(x): return x * 2; print(f(3)) # comment [1, 2, 3] {"key": "value"}
"""


def env_text(name: str, split: str, episodes: int, seed: int) -> Iterator[str]:
    """Prompts, expert answers and feedback from one env/split, via the public env API."""
    env = make(name, split=split)
    rng = random.Random(seed)
    expert = _expert_fn(name)
    for ep in range(episodes):
        obs, info = env.reset(seed=seed * 100_003 + ep)
        yield obs["text"]
        for _ in range(64):
            answer = expert(info) if rng.random() < 0.7 else rng.choice(["", "1+2", '{"x": 1}'])
            yield answer
            obs, _, terminated, truncated, info = env.step(answer)
            yield obs["text"]
            if terminated or truncated:
                break


def _expert_fn(name: str):
    """info -> the expert's answer for the env's current state."""
    if name.startswith("gp"):
        from sftrl_jax.envs.general_points import expert

        return lambda info: expert.expert_answer(info["cards"], info["numbers"])
    from sftrl_jax.envs.virl import expert

    return expert.expert_answer


def corpus(episodes: int) -> Iterator[str]:
    yield GENERIC
    for name, splits in (
        ("gp-l", ("train", "ood-rule")),
        ("gp-vl", ("train", "ood-rule", "ood-visual")),
        ("virl-l", ("train", "ood-rule")),
        ("virl-vl", ("train", "ood-visual")),
    ):
        for i, split in enumerate(splits):
            try:
                yield from env_text(name, split, episodes, seed=i)
            except ImportError as e:  # an env not built yet: skip it, say so
                print(f"skipping {name}/{split}: {e}", file=sys.stderr)
                break


# Qwen2's pre-tokenizer split (transformers' `tokenization_qwen2.PRETOKENIZE_REGEX`): single digits,
# letters with one leading non-letter, newline runs apart from what follows them.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_bpe(texts: list[str], *, vocab: int, specials: tuple[str, ...], family: str):
    """A byte-level BPE of `vocab` ids in all, `specials` last (in their order)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    if family == "llama3":
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:  # as transformers' Qwen2Tokenizer builds it
        bpe.normalizer = normalizers.NFC()
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.add_special_tokens(list(specials))
    return bpe


def write_llama3(bpe, out: Path) -> int:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=(ROOT / "sftrl_jax" / "data" / "chat_template.jinja").read_text(),
        model_max_length=131072,
    )
    hf.save_pretrained(str(out))
    return len(hf)


def write_chatml(bpe, out: Path) -> int:
    """tokenizer.json and a tokenizer_config.json with Qwen2.5-Instruct's keys (chat template inside,
    as in Qwen's folders, not a separate chat_template.jinja)."""
    bpe.save(str(out / "tokenizer.json"))
    vocab = bpe.get_vocab(with_added_tokens=True)
    added = {
        str(vocab[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in tok_lib.CHATML.special_tokens
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in tok_lib.CHATML.special_tokens if t != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": (ROOT / "sftrl_jax" / "data" / "chat_template_chatml.jinja").read_text(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return bpe.get_vocab_size(with_added_tokens=True)


def build(family: str, texts: list[str], *, vocab: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sha256.json").unlink(missing_ok=True)  # the old record would refuse the new files
    fmt = tok_lib.CHAT_FORMATS[family]
    bpe = train_bpe(texts, vocab=vocab, specials=fmt.special_tokens, family=family)
    n = (write_llama3 if family == "llama3" else write_chatml)(bpe, out)
    # the record `sftrl_jax.integrity` checks at every load of the folder
    record = {"sha256": {p.name: integrity.sha256_of(str(p)) for p in sorted(out.iterdir()) if p.is_file()}}
    (out / "sha256.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}: {family}, {n} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("llama3", "chatml", "both"), default="both")
    parser.add_argument("--vocab", type=int, default=2048, help="total size including special tokens")
    parser.add_argument("--episodes", type=int, default=300, help="episodes per env split in the corpus")
    parser.add_argument("--out", default=None, help="output folder (one family only; default: the shipped one)")
    args = parser.parse_args()
    families = ("llama3", "chatml") if args.family == "both" else (args.family,)
    if args.out is not None and len(families) > 1:
        parser.error("--out needs one --family")
    texts = list(corpus(args.episodes))  # both families learn from the same text
    for family in families:
        out = args.out if args.out is not None else tok_lib.default_tokenizer_path(family)
        build(family, texts, vocab=args.vocab, out=Path(out))


if __name__ == "__main__":
    main()

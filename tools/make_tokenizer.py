"""Builds the small byte-level BPE tokenizer shipped for CPU runs (sftrl_jax/data/assets/tokenizer).

    .venv/bin/python tools/make_tokenizer.py [--vocab 2048] [--out sftrl_jax/data/assets/tokenizer]

Trained on text the environments generate (prompts of every split, expert answers, verifier
feedback) plus a little generic English, so any text still encodes (byte fallback). Digits are
split one per token, which helps tiny models learn arithmetic. The Llama-3 special tokens follow
the learned vocabulary, `<|image|>` last as in Llama 3.2 Vision, and the chat template is
`sftrl_jax/data/chat_template.jinja`. Loadable with `transformers.AutoTokenizer.from_pretrained`.
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


def build(vocab: int, episodes: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    n_special = len(tok_lib.SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab - n_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(episodes), trainer=trainer)
    bpe.add_special_tokens(list(tok_lib.SPECIAL_TOKENS))
    template = (ROOT / "sftrl_jax" / "data" / "chat_template.jinja").read_text()
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=template,
        model_max_length=131072,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=2048, help="total size including special tokens")
    parser.add_argument("--episodes", type=int, default=300, help="episodes per env split in the corpus")
    parser.add_argument("--out", default=tok_lib.default_tokenizer_path())
    args = parser.parse_args()
    hf = build(args.vocab, args.episodes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sha256.json").unlink(missing_ok=True)  # the old record would refuse the new files
    hf.save_pretrained(args.out)
    # the record `sftrl_jax.integrity` checks at every load of the folder
    record = {"sha256": {p.name: integrity.sha256_of(str(p)) for p in sorted(out.iterdir()) if p.is_file()}}
    (out / "sha256.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}: {len(hf)} tokens")


if __name__ == "__main__":
    main()

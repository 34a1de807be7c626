"""The shipped small tokenizer and the wrapper: special tokens, chat template, loss masks."""

import pytest
from transformers import AutoTokenizer

import sftrl_jax.envs as envs
from sftrl_jax.data import tokenizer as tok_lib
from sftrl_jax.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return tok_lib.load_tokenizer()


def test_shipped_tokenizer_loads_with_transformers_and_has_llama_specials():
    hf = AutoTokenizer.from_pretrained(tok_lib.default_tokenizer_path())
    vocab = hf.get_vocab()
    ids = [vocab[t] for t in tok_lib.SPECIAL_TOKENS]
    assert ids == list(range(len(hf) - len(ids), len(hf)))  # specials last, <|image|> the very last id
    assert hf.bos_token == "<|begin_of_text|>" and hf.eos_token == "<|eot_id|>"


def test_chat_template_renders_llama_format(tok):
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Cards? "}]},
        {"role": "assistant", "content": "4*6=24"},
    ]
    assert tok.chat_text(msgs) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Cards?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4*6=24<|eot_id|>"
    )
    gen = tok.chat_text(msgs[:1], add_generation_prompt=True)
    assert gen.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.chat_ids(msgs)[0] == tok.bos_id and tok.chat_ids(msgs).count(tok.image_token_id) == 1


def test_loss_mask_covers_every_assistant_turn_and_nothing_else(tok):
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b1"},
        {"role": "user", "content": "You failed this trial because x."},
        {"role": "assistant", "content": "c2"},
    ]
    ids, mask = tok.encode_conversation(msgs)
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned, skip_special_tokens=False) == "b1<|eot_id|>c2<|eot_id|>"
    # a turn marked loss: False stays in the ids (context) but is not a target
    ids2, mask2 = tok.encode_conversation([msgs[0], {**msgs[1], "loss": False}, *msgs[2:]])
    assert ids2 == ids
    learned = [i for i, m in zip(ids2, mask2) if m]
    assert tok.decode(learned, skip_special_tokens=False) == "c2<|eot_id|>"
    assert "b1" in tok.decode(ids2, skip_special_tokens=False)


@pytest.mark.parametrize("name", ["gp-l", "virl-l"])
def test_env_text_round_trips_and_is_compact(tok, name):
    obs, _ = envs.make(name, split="ood-rule").reset(seed=3)
    ids = tok.encode(obs["text"])
    assert tok.decode(ids) == obs["text"]
    assert len(ids) < len(obs["text"]) / 2.5  # BPE learned the env vocabulary
    assert tok.stop_ids[0] == tok.eot_id and tok.vocab_size == 2048


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tok_lib.load_tokenizer(tmp_path / "nope")

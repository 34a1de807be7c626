"""The ChatML family (Qwen2.5-Instruct's format) in the tokenizer wrapper, on the shipped small ChatML
tokenizer: ids equal transformers' chat template, the assistant-only mask token by token on GP revision
data, stop / pad ids, SFT batches, episodes that stop at `<|im_end|>`; the Llama-3 family unchanged."""

import json
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.qwen2 import tokenization_qwen2

from sftrl_jax import episodes, integrity
from sftrl_jax.data import conversations, generate, sft
from sftrl_jax.data import tokenizer as tok_lib
from sftrl_jax.errors import UserError
from sftrl_jax.sampling.policy import Policy
from tests.rl.test_rollout import Countdown, scripted

QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "Cards: 4, 6. Target: 24."}],
    [
        {"role": "user", "content": "Cards: 4, 6.\nOutput JSON."},
        {"role": "assistant", "content": '{"formula": "4+6"}'},
        {"role": "user", "content": "You failed this trial because the formula is wrong."},
        {"role": "assistant", "content": '{"formula": "4*6"}'},
    ],
]


@pytest.fixture(scope="module")
def tok():
    return tok_lib.load_tokenizer(tok_lib.default_tokenizer_path("chatml"))


def ids_of(tok, token):
    return tok.hf.convert_tokens_to_ids(token)


def test_shipped_chatml_tokenizer_is_laid_out_as_qwen2_5_instruct():
    path = tok_lib.default_tokenizer_path("chatml")
    hf = AutoTokenizer.from_pretrained(path)
    assert type(hf).__name__ == "Qwen2Tokenizer" and len(hf) == 2048
    vocab = hf.get_vocab()
    ids = [vocab[t] for t in tok_lib.CHATML_SPECIAL_TOKENS]
    assert ids == list(range(2048 - len(ids), 2048))  # specials last, <|endoftext|> first of them as in Qwen
    assert hf.bos_token is None and hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    split = json.loads(hf.backend_tokenizer.to_str())["pre_tokenizer"]["pretokenizers"][0]
    assert split["pattern"]["Regex"] == tokenization_qwen2.PRETOKENIZE_REGEX  # Qwen2's pre-tokenizer
    config = json.loads(open(f"{path}/tokenizer_config.json").read())
    assert "You are Qwen, created by Alibaba Cloud." in config["chat_template"]  # inside, as in Qwen's folders
    assert set(integrity.recorded_digests(path)) == {"tokenizer.json", "tokenizer_config.json"}
    integrity.verify_folder(path)


def test_chatml_special_ids(tok):
    assert tok.chat_format is tok_lib.CHATML
    assert tok.eot_id == ids_of(tok, "<|im_end|>") == 2036
    assert tok.stop_ids == (2036, ids_of(tok, "<|endoftext|>")) == (2036, 2034)
    assert tok.pad_id == ids_of(tok, "<|endoftext|>") and tok.pad_id != tok.eot_id
    assert tok.bos_id is None and tok.image_token_id is None and tok.vocab_size == 2048


def test_llama3_family_is_unchanged():
    tok = tok_lib.load_tokenizer()
    vocab = tok.hf.get_vocab()
    assert tok.chat_format is tok_lib.LLAMA3 and tok.path == tok_lib.default_tokenizer_path("llama3")
    assert (tok.bos_id, tok.eot_id, tok.image_token_id, tok.pad_id) == (
        vocab["<|begin_of_text|>"],
        vocab["<|eot_id|>"],
        vocab["<|image|>"],
        vocab["<|finetune_right_pad_id|>"],
    )
    assert tok.stop_ids == tuple(vocab[t] for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))


@pytest.mark.parametrize("chat", CHATS)
def test_chat_and_generation_prompt_ids_equal_the_hf_template(tok, chat):
    for gen in (False, True):
        want = tok.hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen, return_dict=False)
        assert tok.chat_ids(chat, add_generation_prompt=gen) == list(want)


def test_chatml_text_default_system_and_generation_prompt(tok):
    assert tok.chat_text(CHATS[0], add_generation_prompt=True) == (
        QWEN_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.chat_text(CHATS[1]) == (
        "<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\nCards: 4, 6. Target: 24.<|im_end|>\n"
    )
    ids = tok.chat_ids(CHATS[0], add_generation_prompt=True)
    assert ids[0] == ids_of(tok, "<|im_start|>")  # no BOS
    header = [ids_of(tok, "<|im_start|>"), *tok.encode("assistant\n")]
    assert ids[-len(header) :] == header


def _segments(tok, parts):
    """[(text, target)] -> ids and mask, each part encoded on its own."""
    ids, mask = [], []
    for text, target in parts:
        piece = tok.encode(text)
        ids += piece
        mask += [int(target)] * len(piece)
    return ids, mask


def test_revision_mask_token_by_token_on_gp_expert_data(tok, tmp_path):
    out = tmp_path / "gp.json"
    generate.generate_gp_sft("gp-l", "train", 3, out, seed=0, revisions=1.0)
    example = json.loads(out.read_text())[0]
    prompt, failed, feedback, answer = (t["value"] for t in example["conversations"])
    assert example["conversations"][1]["loss"] is False and "You failed this trial" in feedback
    messages = conversations.to_messages(example)
    ids, mask = tok.encode_conversation(messages)
    want_ids, want_mask = _segments(
        tok,
        [
            (QWEN_SYSTEM, 0),
            (f"<|im_start|>user\n{prompt}<|im_end|>\n", 0),
            ("<|im_start|>assistant\n", 0),
            (f"{failed}<|im_end|>", 0),  # a failed try: context only
            ("\n", 0),
            (f"<|im_start|>user\n{feedback}<|im_end|>\n", 0),
            ("<|im_start|>assistant\n", 0),  # the generation prompt
            (f"{answer}<|im_end|>", 1),  # the answer and its end: what sampling produces before stopping
            ("\n", 0),  # after the stop token: never generated
        ],
    )
    assert ids == want_ids and mask == want_mask
    # with the failed try as a target too, both assistant turns are masked, each exactly
    ids2, mask2 = tok.encode_conversation([{**m, "loss": True} if m["role"] == "assistant" else m for m in messages])
    assert ids2 == ids
    learned = tok.decode([i for i, m in zip(ids2, mask2) if m], skip_special_tokens=False)
    assert learned == f"{failed}<|im_end|>{answer}<|im_end|>"
    assert sum(mask2) == sum(mask) + len(tok.encode(f"{failed}<|im_end|>"))


def test_system_message_and_loss_false_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, *CHATS[2]]
    ids, mask = tok.encode_conversation(msgs)
    learned = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert learned == '{"formula": "4+6"}<|im_end|>{"formula": "4*6"}<|im_end|>'
    ids2, mask2 = tok.encode_conversation([*msgs[:2], {**msgs[2], "loss": False}, *msgs[3:]])
    learned = tok.decode([i for i, m in zip(ids2, mask2) if m], skip_special_tokens=False)
    assert ids2 == ids and learned == '{"formula": "4*6"}<|im_end|>'
    assert mask[-1] == 0 and ids[-1] == tok.encode("\n")[0]


def test_image_content_is_refused_and_text_lists_are_joined(tok):
    text_list = [{"role": "user", "content": [{"type": "text", "text": "Cards: "}, {"type": "text", "text": "4, 6"}]}]
    assert tok.chat_ids(text_list) == tok.chat_ids([{"role": "user", "content": "Cards: 4, 6"}])
    with pytest.raises(UserError, match="has no image token"):
        tok.chat_ids([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])


def test_assistant_first_is_refused(tok):
    with pytest.raises(UserError, match="starts with an assistant turn"):
        tok.encode_conversation([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])


def test_a_tokenizer_of_neither_family_is_refused_in_one_line():
    from tokenizers import Tokenizer, models

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "<s>": 1}, merges=[]))
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template="{{ messages }}")
    with pytest.raises(UserError) as e:
        tok_lib.Tokenizer(hf, path="/ckpts/odd")
    msg = str(e.value)
    assert "\n" not in msg and "/ckpts/odd" in msg and "<|eot_id|>" in msg and "<|im_end|>" in msg
    with pytest.raises(UserError, match="no shipped tokenizer of family 'gemma'"):
        tok_lib.default_tokenizer_path("gemma")


def test_a_changed_shipped_chatml_tokenizer_is_refused(tmp_path):
    copy = shutil.copytree(tok_lib.default_tokenizer_path("chatml"), tmp_path / "tok")
    cfg = copy / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("You are Qwen", "You are Owen"))
    with pytest.raises(UserError, match="tokenizer_config.json: sha256 is"):
        tok_lib.load_tokenizer(copy)


def test_sft_batches_from_a_chatml_tokenizer(tok, tmp_path):
    examples = [
        {"conversations": [{"from": "human", "value": f"Add {i} and 1."}, {"from": "gpt", "value": f"{i + 1}"}]}
        for i in range(4)
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(examples))
    cfg = sft.SFTDataConfig(train_files=(str(path),), batch_size=2, buckets=(64, 128), max_length=128, shuffle=False)
    batch = next(sft.SFTData(cfg, tok).iterator())
    assert batch["input_ids"].shape == (2, 128)  # 70 tokens, 36 of them the default system message
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        ids = batch["input_ids"][b, :n].tolist()
        assert ids[0] == ids_of(tok, "<|im_start|>") and ids[-2:] == [tok.eot_id, *tok.encode("\n")]
        assert (batch["input_ids"][b, n:] == tok.pad_id).all()
        np.testing.assert_array_equal(batch["targets"][b, : n - 1], ids[1:])
        learned = batch["targets"][b][batch["loss_mask"][b] == 1].tolist()
        assert tok.decode(learned, skip_special_tokens=False) == f"{b + 1}<|im_end|>"
        assert batch["loss_mask"][b, n - 2 :].sum() == 0  # the target "\n" after <|im_end|> is not learned


def test_episodes_stop_at_im_end_and_revise_in_chatml(tok):
    policy, calls = scripted(tok, lambda ep, fails: "ok" if fails >= 1 else "no")
    runner = episodes.EpisodeRunner([Countdown()], tok, policy)
    buffer = episodes.collect(runner, 2)
    first, second = buffer[0][0], buffer[1][0]
    assert first.response_ids[-1] == tok.eot_id and first.text == "no" and second.text == "ok"
    assert second.reward == 5.0 and second.terminated
    ctx = tok.decode(second.context_ids, skip_special_tokens=False)
    assert ctx == (
        QWEN_SYSTEM + "<|im_start|>user\nepisode 0: say ok<|im_end|>\n<|im_start|>assistant\nno<|im_end|>\n"
        "<|im_start|>user\nYou failed this trial because wrong.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert second.context_ids == tok.chat_ids(
        [
            {"role": "user", "content": "episode 0: say ok"},
            {"role": "assistant", "content": "no"},
            {"role": "user", "content": "You failed this trial because wrong."},
        ],
        add_generation_prompt=True,
    )
    # the sampling policy stops at the tokenizer's stop ids unless told otherwise
    assert Policy(None, tok, max_new_tokens=4).stop_tokens == (tok.eot_id, tok.pad_id)

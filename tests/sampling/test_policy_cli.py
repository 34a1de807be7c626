"""The rollout policy adapter over the sampler, and `sftrl sample`."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from sftrl_jax import cli, models, sampling
from sftrl_jax.data.tokenizer import load_tokenizer
from sftrl_jax.errors import UserError
from sftrl_jax.models import checkpoint
from sftrl_jax.models import config as config_lib
from tests.sampling.helpers import peaked_model

VOCAB = 2048  # the shipped tokenizer's ids


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return peaked_model(config_lib.LlamaConfig.tiny(vocab_size=VOCAB, max_position_embeddings=1024), seed=5)


def test_policy_returns_responses_to_the_stop_token_with_temperature_logprobs(llama, tokenizer):
    contexts = [
        tokenizer.chat_ids([{"role": "user", "content": text}], add_generation_prompt=True)
        for text in ("What is 3 + 4?", "Go north, then turn left at the cafe.")
    ]
    # stop on a token the model emits often, so that some responses end early
    stop = int(np.bincount(sampling.generate(llama, contexts, max_new_tokens=12, seed=0).tokens.ravel()).argmax())
    policy = sampling.Policy(
        llama, tokenizer, max_new_tokens=12, temperature=0.7, seed=3, stop_tokens=(*tokenizer.stop_ids, stop)
    )
    out = policy(contexts, [[], []])
    assert len(out) == 2 and policy.calls == 1
    for ids, logps in out:
        assert len(ids) == len(logps) >= 1
        assert ids[-1] in policy.stop_tokens or len(ids) == 12
        assert not set(ids[:-1]) & set(policy.stop_tokens)
    result = policy.last_result
    assert sampling.logprob_gap(llama, contexts, result) < 1e-5
    np.testing.assert_allclose(out[0][1], result.logprobs_temperature[0, : len(out[0][0])])
    assert policy(contexts, [[], []]) != out  # the next call draws with a new seed
    again = sampling.Policy(
        llama, tokenizer, max_new_tokens=12, temperature=0.7, seed=3, stop_tokens=policy.stop_tokens
    )
    assert again(contexts, [[], []]) == out  # ... and a run with the same seed repeats
    with pytest.raises(UserError, match="no image_processor"):
        policy(contexts, [[Image.new("RGB", (8, 8))], []])


def test_sample_command_with_hf_folder_and_checkpoint(llama, tmp_path, capsys):
    hf = str(tmp_path / "hf")
    models.save_pretrained(llama, hf)
    ckpt = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(llama, ckpt)
    outputs = []
    for path in (hf, ckpt):
        rc = cli.main(["sample", "--model", path, "--prompt", "Hello there", "--max-new-tokens", "6", "--show-tokens"])
        assert rc == 0
        out = capsys.readouterr().out.splitlines()
        assert out[-1].startswith("[") and "generated" in out[-1]
        outputs.append(out)
    assert outputs[0][:-1] == outputs[1][:-1]  # same weights, same greedy reply
    # bad input: an image for a text model, a missing folder
    Image.new("RGB", (40, 30), "red").save(tmp_path / "x.png")
    assert cli.main(["sample", "--model", hf, "--prompt", "hi", "--image", str(tmp_path / "x.png")]) == 2
    assert "needs a vision model" in capsys.readouterr().err
    assert cli.main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_sample_command_with_an_image(tmp_path, capsys, tokenizer):
    tiny = config_lib.MllamaConfig.tiny(vocab_size=VOCAB - 1)  # <|image|> is the tokenizer's last id
    cfg = dataclasses.replace(tiny, image_token_index=tokenizer.image_token_id)
    path = str(tmp_path / "mllama")
    models.save_pretrained(peaked_model(cfg, seed=6), path)
    Image.new("RGB", (60, 30), (200, 30, 30)).save(tmp_path / "cards.png")
    args = ["sample", "--model", path, "--prompt", "What is this?", "--max-new-tokens", "5", "--show-tokens"]
    assert cli.main([*args, "--image", str(tmp_path / "cards.png")]) == 0
    with_image = capsys.readouterr().out
    assert "tokens:" in with_image
    assert cli.main([*args, "--image", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err

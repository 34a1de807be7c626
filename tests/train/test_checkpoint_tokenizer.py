"""A run's model checkpoints carry the tokenizer it trained with: `sftrl eval --ckpt` and
`sftrl rl model.init=` read a Qwen2.5 (ChatML) checkpoint with its ChatML tokenizer, not the
shipped Llama-3 one (before, `final/` held no tokenizer and every reader fell back to the shipped
one: a ChatML-trained model was evaluated on Llama-3 chat ids without a word)."""

import json
import os

from sftrl_jax import config
from sftrl_jax.data.generate import generate_gp_sft
from sftrl_jax.data.tokenizer import CHATML, LLAMA3, default_tokenizer_path, load_tokenizer
from sftrl_jax.models.checkpoint import TOKENIZER_FILES, is_checkpoint
from sftrl_jax.sft.train import SFTConfig, train
from sftrl_jax.train.state import ModelSection, load_for_eval, tokenizer_for
from tests.sft.test_sft_train import TINY


def _run(tmp_path, preset: str) -> str:
    data = str(tmp_path / "gp_l.json")
    generate_gp_sft("gp-l", "train", 16, data, seed=0)
    d = json.loads(json.dumps(TINY))
    d["model"]["preset"] = preset
    d["data"]["train_files"] = [data]
    d["train"].update(run_dir=str(tmp_path / preset), steps=2, save_every=2, snapshot_every=1)
    path = tmp_path / f"{preset}.yaml"
    path.write_text(json.dumps(d))
    train(config.load(SFTConfig, path))
    return d["train"]["run_dir"]


def test_final_and_snapshots_carry_the_runs_tokenizer(tmp_path):
    run_dir = _run(tmp_path, "qwen2.5-tiny")
    shipped = load_tokenizer(default_tokenizer_path("chatml"))
    for folder in (os.path.join(run_dir, "final"), os.path.join(run_dir, "snapshots", "1")):
        assert is_checkpoint(folder)
        assert set(os.listdir(folder)) - {"params", "model_config.json"} <= set(TOKENIZER_FILES)
        _, tok, _ = load_for_eval(folder, "gp-l")
        assert tok.chat_format == CHATML and tok.eot_id == shipped.eot_id and tok.vocab_size == shipped.vocab_size
        chat = [{"role": "user", "content": "4 cards: A 3 K 10"}]
        assert tok.chat_ids(chat, add_generation_prompt=True) == shipped.chat_ids(chat, add_generation_prompt=True)
    # what the next stage (sftrl rl model.init=<final>) reads
    assert tokenizer_for(ModelSection(init=os.path.join(run_dir, "final"))).chat_format == CHATML


def test_a_qwen_preset_defaults_to_the_chatml_tokenizer_and_llama_to_llama3():
    assert tokenizer_for(ModelSection(preset="qwen2.5-tiny")).chat_format == CHATML
    assert tokenizer_for(ModelSection(preset="llama-tiny")).chat_format == LLAMA3


def test_a_checkpoint_with_its_tokenizer_is_replaced_whole(tmp_path):
    from sftrl_jax.models import create_model
    from sftrl_jax.models.checkpoint import save_checkpoint
    from sftrl_jax.train.state import preset_config

    model = create_model(preset_config("qwen2.5-tiny"))
    tok = load_tokenizer(default_tokenizer_path("chatml"))
    path = str(tmp_path / "final")
    save_checkpoint(model, path, extra=tok.hf.save_pretrained)
    first = sorted(os.listdir(path))
    save_checkpoint(model, path, extra=tok.hf.save_pretrained)  # a folder of ours: replaced, not refused
    assert sorted(os.listdir(path)) == first and "tokenizer.json" in first
    assert sorted(os.listdir(tmp_path)) == ["final"]

"""Qwen2.5 HF <-> ours: round trips through transformers (tied and untied heads, per layer and stacked,
sharded bf16 files), `sftrl convert / export / inspect`, and bad folders that must fail naming the
file, key, shapes or config field."""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import cli, models
from sftrl_jax.errors import UserError
from sftrl_jax.models import build, checkpoint, convert
from sftrl_jax.models import config as config_lib
from tests.models.test_convert import _copy, _edit_config, _rewrite, _tensors
from tests.models.test_qwen_parity import hf_folder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf
TIED, UNTIED = config_lib.Qwen2Config.tiny(), config_lib.Qwen2Config.tiny(tie_word_embeddings=False, num_kv_heads=1)


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    return hf_folder(TIED, str(tmp_path_factory.mktemp("hf_qwen_tied")), seed=31)


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in build.flat_params(nnx.state(model, nnx.Param)).items()}


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("cfg", [TIED, UNTIED], ids=["tied", "untied"])
def test_round_trip_through_transformers(cfg, tmp_path):
    """HF -> ours -> HF: the same tensors bit for bit under the same keys, which transformers loads
    with nothing missing or unexpected into the same logits; ours -> HF -> ours: the same parameters."""
    hf, path = hf_folder(cfg, str(tmp_path / "hf"), seed=32)
    assert ("lm_head.weight" in _tensors(path)) != cfg.text.tie_word_embeddings
    ours = models.from_pretrained(path)
    assert isinstance(ours, models.Qwen2ForCausalLM) and ours.config == cfg
    assert ("lm_head" in _params(ours)) != cfg.text.tie_word_embeddings
    out = str(tmp_path / "out")
    models.save_pretrained(ours, out)
    _equal(_tensors(out), _tensors(path))
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["model_type"] == "qwen2"
    assert not written["use_sliding_window"] and "attention_bias" not in written
    reloaded, info = transformers.Qwen2ForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor(np.random.default_rng(0).integers(0, cfg.text.vocab_size, (2, 9)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded.eval()(input_ids=ids).logits.numpy(), hf(input_ids=ids).logits.numpy())
    back = models.from_pretrained(out)
    assert back.config == cfg
    _equal(_params(back), _params(ours))


def test_hf_to_stacked_to_hf_bit_for_bit(tied_folder, tmp_path):
    _, path = tied_folder
    stacked = models.from_pretrained(path, scan_layers=True)
    q_bias = build.flat_params(nnx.state(stacked))["model.stacks.0.self_attn.q_bias"]
    assert q_bias.shape == (2, 4, 16)
    assert tuple(q_bias.get_metadata()["out_sharding"]) == ("layers", "heads", "head_dim")
    per_layer = _params(models.from_pretrained(path))
    for key, value in _params(stacked).items():  # slice g of stack 0 is layer g (one stack: period 1)
        if ".stacks." in key:
            for g in range(value.shape[0]):
                np.testing.assert_array_equal(value[g], per_layer[key.replace("stacks.0", f"layers.{g}")])
    out = str(tmp_path / "out")
    models.save_pretrained(stacked, out)
    _equal(_tensors(out), _tensors(path))


def test_sharded_bf16_export_and_reload(tied_folder, tmp_path):
    _, path = tied_folder
    ours = models.from_pretrained(path)
    out = str(tmp_path / "sharded")
    models.save_pretrained(ours, out, dtype=jnp.bfloat16, max_shard_bytes=20_000)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(out) if n.startswith("model-0")]) > 2
    back = models.from_pretrained(out, dtype=jnp.bfloat16)
    for key, value in _params(ours).items():
        np.testing.assert_array_equal(value.astype(ml_dtypes.bfloat16), _params(back)[key], err_msg=key)


def test_convert_export_inspect_commands(tied_folder, tmp_path, capsys):
    _, path = tied_folder
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf_out")
    n = build.param_count(TIED)
    assert cli.main(["convert", "--hf", path, "--out", ckpt, "--mesh", "data=1,fsdp=-1,tensor=1"]) == 0
    assert f"Qwen2ForCausalLM: {n:,} parameters" in capsys.readouterr().out
    stored, _ = checkpoint.read_checkpoint_config(ckpt)
    assert stored == TIED and type(stored) is config_lib.Qwen2Config
    restored = checkpoint.load_checkpoint(ckpt, scan_layers=True)
    assert type(restored) is models.Qwen2ForCausalLM
    assert cli.main(["export", "--ckpt", ckpt, "--out", out]) == 0
    _equal(_tensors(out), _tensors(path))
    for target in (ckpt, out, os.path.join(out, "config.json")):
        assert cli.main(["inspect", target]) == 0
        text = capsys.readouterr().out
        assert f"parameters: {n}" in text and "architecture: Qwen2ForCausalLM" in text, text
        assert "q/k/v bias" in text and "tied lm_head" in text


# --------------------------------------------------------------------------------------------------
# Bad input


def test_missing_unexpected_and_wrong_shape_tensors_are_named(tied_folder, tmp_path):
    folder = _copy(tied_folder[1], tmp_path)
    key = "model.layers.1.self_attn.k_proj.bias"
    _rewrite(folder, lambda t: {**t, key: t[key][:8]})
    with pytest.raises(UserError) as e:
        models.from_pretrained(folder)
    msg = str(e.value)
    assert "model.safetensors" in msg and key in msg and "[8]" in msg and "[32]" in msg
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(UserError, match=rf"missing tensor.*{key.replace('.', '[.]')}"):
        models.from_pretrained(folder)
    o_bias = "model.layers.0.self_attn.o_proj.bias"
    _rewrite(folder, lambda t: {**_tensors(tied_folder[1]), o_bias: np.zeros(64, np.float32)})
    with pytest.raises(UserError, match=rf"unexpected tensor.*for Qwen2ForCausalLM.*{o_bias.replace('.', '[.]')}"):
        models.from_pretrained(folder)


def test_tied_checkpoint_with_a_different_lm_head_is_refused(tied_folder, tmp_path):
    folder = _copy(tied_folder[1], tmp_path)
    same = lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].copy()}  # noqa: E731
    _rewrite(folder, same)
    models.from_pretrained(folder)  # a stored copy of the embedding is dropped
    _rewrite(folder, lambda t: {**t, "lm_head.weight": t["lm_head.weight"] + 1})
    with pytest.raises(UserError, match=r"lm_head\.weight.*differs from 'model\.embed_tokens\.weight'"):
        models.from_pretrained(folder)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (dict(use_sliding_window=True, sliding_window=4096), "use_sliding_window=true"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types="),
        (dict(use_mrope=True), "use_mrope=True"),
        (dict(attention_bias=True), "unsupported field(s) attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
        (dict(num_key_value_heads=3), "num_kv_heads"),
    ],
)
def test_bad_config_fields_are_named(tied_folder, tmp_path, edit, needle):
    folder = _copy(tied_folder[1], tmp_path)
    _edit_config(folder, lambda d: d.update(edit))
    with pytest.raises(UserError) as e:
        models.from_pretrained(folder)
    assert needle in str(e.value) and "config.json" in str(e.value)


def test_sliding_window_fields_are_ignored_while_off(tied_folder, tmp_path):
    """The hub's Qwen2.5 files carry `sliding_window` and `max_window_layers` with the window off."""
    folder = _copy(tied_folder[1], tmp_path)
    _edit_config(folder, lambda d: d.update(use_sliding_window=False, sliding_window=32768, max_window_layers=21))
    assert convert.read_config(folder)[0] == TIED

"""Qwen2.5 configs: the presets are the hub's config.json files, whose parameter counts (`sftrl inspect`,
abstractly) equal transformers' `Qwen2ForCausalLM` built on the meta device; the config.json that
transformers 5 writes reads the same; the run presets."""

import dataclasses
import json

import pytest

from sftrl_jax import cli, models
from sftrl_jax.errors import UserError
from sftrl_jax.models import build
from sftrl_jax.models import config as config_lib
from sftrl_jax.train import state as train_state
from tests.models import hf_helpers as H

Q = config_lib.Qwen2Config


def hub_config(hidden, intermediate, layers, heads, kv_heads, vocab, tied, window_layers, window) -> dict:
    """config.json of Qwen/Qwen2.5-*-Instruct as published (transformers 4.43 wrote them)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": window_layers,
        "model_type": "qwen2",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": window,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


# preset -> (its hub config.json, the parameter count transformers reports)
HUB = {
    "0.5b": (hub_config(896, 4864, 24, 14, 2, 151936, True, 21, 32768), 494_032_768),
    "1.5b": (hub_config(1536, 8960, 28, 12, 2, 151936, True, 21, 32768), 1_543_714_304),
    "3b": (hub_config(2048, 11008, 36, 16, 2, 151936, True, 70, 32768), 3_085_938_688),
    "7b": (hub_config(3584, 18944, 28, 28, 4, 152064, False, 28, 131072), 7_615_616_512),
}


@pytest.mark.parametrize("size", list(HUB))
def test_hub_config_is_the_preset_and_counts_agree(size, tmp_path, capsys):
    hub, n = HUB[size]
    cfg = config_lib.from_hf_dict(hub)
    assert cfg == Q.qwen2_5(size) == train_state.preset_config(f"qwen2.5-{size}")
    assert (
        type(cfg) is Q and cfg.text.qkv_bias and cfg.text.head_dim == hub["hidden_size"] // hub["num_attention_heads"]
    )
    assert build.param_count(cfg) == n
    # `sftrl inspect` on the hub's config.json, abstractly
    folder = H.write_config(hub, str(tmp_path))
    assert cli.main(["inspect", folder, "--mesh", "data=1,fsdp=8,tensor=1", "--dtype", "bfloat16"]) == 0
    assert f"parameters: {n}" in capsys.readouterr().out.splitlines()
    # our config.json reads back as the same model
    assert config_lib.from_hf_dict(config_lib.to_hf_dict(cfg)) == cfg


@pytest.mark.hf
@pytest.mark.parametrize("size", list(HUB))
def test_param_count_matches_transformers_on_meta_device(size):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hub, n = HUB[size]
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_dict(hub))
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) == n
    assert build.param_count(Q.qwen2_5(size)) == n


@pytest.mark.hf
@pytest.mark.parametrize("cfg", [Q.tiny(), Q.tiny(tie_word_embeddings=False, head_dim=32), Q.qwen2_5("7b")])
def test_config_transformers_5_writes_reads_the_same(cfg):
    """transformers 5 writes `rope_parameters`, `layer_types`, `sliding_window: null` and `dtype`."""
    transformers = pytest.importorskip("transformers")
    written = transformers.Qwen2Config.from_dict(config_lib.to_hf_dict(cfg)).to_dict()
    assert "rope_parameters" in written and "layer_types" in written
    assert config_lib.from_hf_dict(json.loads(json.dumps(written))) == cfg


def test_defaults_are_transformers_qwen2config():
    """Fields a config.json leaves out: transformers' Qwen2Config defaults (theta 1e4, 32768 positions)."""
    hub = HUB["0.5b"][0]
    sparse = {k: v for k, v in hub.items() if k not in ("rope_theta", "max_position_embeddings", "rms_norm_eps")}
    t = config_lib.from_hf_dict(sparse).text
    assert (t.rope_theta, t.max_position_embeddings, t.rms_norm_eps) == (10000.0, 32768, 1e-6)


def test_qkv_bias_belongs_to_the_family():
    with pytest.raises(UserError, match="LlamaForCausalLM has no q/k/v bias"):
        config_lib.LlamaConfig.tiny(qkv_bias=True)
    with pytest.raises(UserError, match="Qwen2ForCausalLM has q/k/v bias"):
        Q.tiny(qkv_bias=False)
    with pytest.raises(UserError, match="Mllama has no q/k/v bias"):
        config_lib.MllamaConfig.tiny(qkv_bias=True)
    # a Qwen2 config is a Llama config (one decoder) but never equal to one
    tiny = Q.tiny()
    assert isinstance(tiny, config_lib.LlamaConfig)
    assert tiny != config_lib.LlamaConfig(dataclasses.replace(tiny.text, qkv_bias=False))
    assert config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(tiny)))) == tiny


def test_run_presets():
    tiny = train_state.preset_config("qwen2.5-tiny", {"vocab_size": 2048, "num_layers": 3})
    assert type(tiny) is Q and tiny.text.vocab_size == 2048 and tiny.text.num_layers == 3
    assert tiny.text.qkv_bias and tiny.text.tie_word_embeddings and tiny.text.rope_theta == 1e6
    assert build.model_class(tiny) is models.Qwen2ForCausalLM
    assert all(p in train_state.PRESETS for p in ("qwen2.5-tiny", *(f"qwen2.5-{s}" for s in HUB)))
    with pytest.raises(UserError, match="Qwen2.5 comes in sizes 0.5b, 1.5b, 3b, 7b, not '14b'"):
        Q.qwen2_5("14b")
    assert train_state.ModelSection(preset="qwen2.5-tiny").preset == "qwen2.5-tiny"

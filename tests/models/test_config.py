"""Model configs: presets, config.json in both styles, refusals naming the field, round trips."""

import copy
import json
import os

import pytest

from sftrl_jax.errors import UserError
from sftrl_jax.models import config as config_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "llama_3_2_11b_vision_config.json")


def load_11b() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


def test_hub_style_11b_config_matches_preset():
    cfg = config_lib.from_hf_dict(load_11b())
    assert cfg == config_lib.MllamaConfig.llama_3_2_11b_vision()
    assert cfg.text.head_dim == 128 and cfg.text.num_embeddings == 128264
    assert cfg.vision.num_patches == 1601 and cfg.vision.output_dim == 7680
    assert cfg.vision.intermediate_layer_features == "input"  # Meta semantics by default
    assert cfg.text.cross_attention_zero_imageless_rows


def test_transformers5_style_rope_parameters():
    d = load_11b()
    t = d["text_config"]
    rope = t.pop("rope_scaling")
    t["rope_parameters"] = {**rope, "rope_theta": t.pop("rope_theta")}
    assert config_lib.from_hf_dict(d) == config_lib.from_hf_dict(load_11b())


def test_rope_scaling_and_rope_parameters_must_agree():
    d = load_11b()
    t = d["text_config"]
    t["rope_parameters"] = {**t["rope_scaling"], "rope_theta": t["rope_theta"]}
    assert config_lib.from_hf_dict(d) == config_lib.from_hf_dict(load_11b())
    t["rope_parameters"]["factor"] = 32.0
    with pytest.raises(UserError, match="rope_scaling and text_config.rope_parameters disagree"):
        config_lib.from_hf_dict(d)


def test_llama_1b_style_config():
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "initializer_range": 0.02,
    }
    assert config_lib.from_hf_dict(d) == config_lib.LlamaConfig.llama_3_2_1b()


@pytest.mark.parametrize("arch,model_type", [("LlamaForCausalLM", "llama"), ("Qwen2ForCausalLM", "qwen2")])
def test_absent_fields_take_the_transformers_class_defaults(arch, model_type):
    """A config.json without rope_theta / rms_norm_eps / max_position_embeddings reads as transformers
    reads it (LlamaConfig's rope_theta default is 1e4; this reader once took Mllama's 5e5 for Llama)."""
    import transformers

    d = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    ours = config_lib.from_hf_dict(d).text
    hf = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k != "model_type"})
    theta = hf.rope_parameters["rope_theta"] if getattr(hf, "rope_parameters", None) else hf.rope_theta
    assert ours.rope_theta == theta == 10000.0
    assert ours.rms_norm_eps == hf.rms_norm_eps
    assert ours.max_position_embeddings == hf.max_position_embeddings


@pytest.mark.parametrize(
    "cfg", [config_lib.MllamaConfig.tiny(), config_lib.LlamaConfig.tiny(), config_lib.LlamaConfig.llama_3_2_1b()]
)
def test_hf_dict_round_trip(cfg):
    assert config_lib.from_hf_dict(config_lib.to_hf_dict(cfg)) == cfg


def test_our_dict_round_trip_keeps_semantics_flags():
    cfg = config_lib.MllamaConfig.tiny().with_transformers_semantics()
    back = config_lib.from_dict(json.loads(json.dumps(config_lib.to_dict(cfg))))
    assert back == cfg
    assert back.vision.intermediate_layer_features == "output"
    assert not back.text.cross_attention_zero_imageless_rows


@pytest.mark.parametrize(
    "edit, needle",
    [
        (
            lambda d: d["text_config"]["rope_scaling"].update(rope_type="yarn"),
            "text_config.rope_scaling.rope_type='yarn'",
        ),
        (lambda d: d["text_config"].update(hidden_act="gelu"), "text_config.hidden_act='gelu'"),
        (lambda d: d["vision_config"].update(hidden_act="quick_gelu"), "vision_config.hidden_act"),
        (lambda d: d["text_config"].update(attention_bias=True), "text_config.attention_bias=True"),
        (lambda d: d["text_config"].update(sliding_window=4096), "text_config.sliding_window"),
        (lambda d: d["text_config"].update(quantization_config={"bits": 4}), "text_config.quantization_config"),
        (lambda d: d["vision_config"].update(vision_output_dim=1234), "vision_config.vision_output_dim=1234"),
        (lambda d: d["text_config"]["rope_scaling"].pop("factor"), "text_config.rope_scaling.factor"),
        (lambda d: d.update(architectures=["Qwen2VLForConditionalGeneration"]), "Qwen2VLForConditionalGeneration"),
        (lambda d: d.update(architectures=None, model_type="gemma"), "'gemma'"),
    ],
)
def test_refusals_name_the_field(edit, needle):
    d = copy.deepcopy(load_11b())
    edit(d)
    with pytest.raises(UserError) as e:
        config_lib.from_hf_dict(d)
    assert needle in str(e.value)


def test_unknown_field_suggests_close_key():
    d = load_11b()
    d["text_config"]["rms_norm_epsilon"] = 1e-5
    with pytest.raises(UserError, match=r"text_config.rms_norm_epsilon \(did you mean 'rms_norm_eps'\?\)"):
        config_lib.from_hf_dict(d)


def test_invalid_values():
    with pytest.raises(UserError, match="num_kv_heads"):
        config_lib.TextConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(UserError, match="cross_attention_layers"):
        config_lib.TextConfig(num_layers=4, cross_attention_layers=(5,))
    with pytest.raises(UserError, match="intermediate_layer_features"):
        config_lib.VisionConfig(intermediate_layer_features="middle")

"""Hugging Face config.json <-> our model configs (`models.config`), both directions, strict.

Every key of a config.json is either read, or known not to change the forward math
(`_IGNORED_HF_KEYS`), or refused with a message naming it; field types are checked (an int is an
int, a flag is true/false), so a checkpoint never loads with a silently different architecture.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

from sftrl_jax.errors import UserError
from sftrl_jax.models.config import (
    DEFAULT_ASPECT_RATIOS,
    LlamaConfig,
    MllamaConfig,
    ModelConfig,
    Qwen2Config,
    TextConfig,
    VisionConfig,
)

# Keys that never change the forward math: generation defaults, bookkeeping, training-only knobs.
_IGNORED_HF_KEYS = frozenset(
    """
    _name_or_path _attn_implementation_autoset _commit_hash add_cross_attention architectures
    attention_dropout bad_words_ids begin_suppress_tokens chunk_size_feed_forward cross_attention_hidden_size
    decoder_start_token_id diversity_penalty do_sample dropout dtype early_stopping
    encoder_no_repeat_ngram_size exponential_decay_length_penalty finetuning_task forced_bos_token_id
    forced_eos_token_id id2label initializer_range is_decoder is_encoder_decoder label2id length_penalty
    max_length min_length model_type no_repeat_ngram_size num_beam_groups num_beams num_return_sequences
    output_attentions output_hidden_states output_scores prefix pretraining_tp problem_type pruned_heads
    remove_invalid_values repetition_penalty return_dict return_dict_in_generate sep_token_id
    suppress_tokens task_specific_params temperature tf_legacy_loss tie_encoder_decoder tokenizer_class
    top_k top_p torch_dtype torchscript transformers_version typical_p use_bfloat16 use_cache
    """.split()
)
_LLAMA3_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor"}
_LLAMA3_ROPE_KEYS |= {"original_max_position_embeddings"}


class _Fields:
    """Reads a config.json section, remembering which keys were used; names keys in errors.

    The typed getters check JSON types instead of converting: `int("2")`, `bool("false")` (True) or
    `int(32.9)` (32) would silently read a different model than transformers does."""

    def __init__(self, d: Mapping[str, Any], where: str):
        if not isinstance(d, Mapping):
            raise UserError(f"config.json: field {where!r} must be an object, got {_short(d)}")
        self.d, self.where, self.used = dict(d), where, set()

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        self.used.add(key)
        if key in self.d and self.d[key] is not None:
            return self.d[key]
        if default is dataclasses.MISSING:
            raise UserError(f"config.json: missing field {self.name(key)!r}")
        return default

    def integer(self, key: str, default: Any = dataclasses.MISSING, *, positive: bool = True) -> int:
        return _integer(self.get(key, default), self.name(key), positive=positive)

    def number(self, key: str, default: Any = dataclasses.MISSING, *, positive: bool = True) -> float:
        return _number(self.get(key, default), self.name(key), positive=positive)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise UserError(f"config.json: field {self.name(key)!r} must be true or false, got {_short(value)}")
        return value

    def integers(self, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        value = self.get(key, default)
        if not isinstance(value, list | tuple) or not all(_is_int(v) and v >= 0 for v in value):
            raise UserError(
                f"config.json: field {self.name(key)!r} must be a list of integers >= 0, got {_short(value)}"
            )
        return tuple(value)

    def token_id(self, key: str, *, many: bool = False) -> int | tuple[int, ...] | None:
        value = self.get(key, None)
        if value is None or (_is_int(value) and value >= 0):
            return value
        if many and isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value):
            return tuple(value)
        kind = "an integer, a list of integers or null" if many else "an integer or null"
        raise UserError(f"config.json: field {self.name(key)!r} must be {kind}, got {_short(value)}")

    def refuse_unless(self, key: str, allowed: tuple, why: str) -> None:
        self.used.add(key)
        if key in self.d and self.d[key] not in allowed:
            raise UserError(f"config.json: unsupported {self.name(key)}={self.d[key]!r} ({why})")

    def check_all_used(self) -> None:
        unknown = sorted(k for k in self.d if k not in self.used and k not in _IGNORED_HF_KEYS)
        if unknown:
            known = sorted(self.used | _IGNORED_HF_KEYS)
            hints = [
                f"{k} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown
            ]
            raise UserError(
                f"config.json: unsupported field(s) {', '.join(self.name(h) for h in hints)}: sftrl_jax does not "
                "implement them and cannot tell whether they change the model's math"
            )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value: Any, name: str, *, positive: bool = True) -> int:
    if not _is_int(value):
        raise UserError(f"config.json: field {name!r} must be an integer, got {_short(value)}")
    if positive and value <= 0:
        raise UserError(f"config.json: field {name!r} must be a positive integer, got {value}")
    return value


def _number(value: Any, name: str, *, positive: bool = True) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"config.json: field {name!r} must be a number, got {_short(value)}")
    if positive and value <= 0:
        raise UserError(f"config.json: field {name!r} must be a positive number, got {value}")
    return float(value)


def _rope_from_hf(f: _Fields, default_theta: float) -> dict[str, Any]:
    """RoPE settings from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (older).

    When both are present they must agree (transformers 5 would let `rope_scaling` win silently).
    """
    f.used |= {"rope_parameters", "rope_scaling", "rope_theta"}
    found = {}
    for key in ("rope_parameters", "rope_scaling"):
        if f.d.get(key) is not None and not isinstance(f.d[key], dict):
            raise UserError(f"config.json: field {f.name(key)!r} must be an object, got {_short(f.d[key])}")
    if f.d.get("rope_parameters") is not None:
        found["rope_parameters"] = _parse_rope(f, "rope_parameters", dict(f.d["rope_parameters"]), default_theta)
    if f.d.get("rope_scaling") is not None or not found:
        found["rope_scaling"] = _parse_rope(f, "rope_scaling", dict(f.d.get("rope_scaling") or {}), default_theta)
    if len(set(map(repr, found.values()))) > 1:
        raise UserError(
            f"config.json: {f.name('rope_scaling')} and {f.name('rope_parameters')} disagree: {found}; keep one"
        )
    return next(iter(found.values()))


def _parse_rope(f: _Fields, key: str, rope: dict, default_theta: float) -> dict[str, Any]:
    theta = rope.get("rope_theta", f.d.get("rope_theta", default_theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UserError(
            f"config.json: unsupported {f.name(key)}.rope_type={rope_type!r}; supported: 'default', 'llama3'"
        )
    allowed = {"rope_type", "type", "rope_theta"} if rope_type == "default" else _LLAMA3_ROPE_KEYS
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"config.json: unsupported {f.name(key)}.partial_rotary_factor={rope['partial_rotary_factor']}")
    allowed = allowed | {"partial_rotary_factor"}
    unknown = sorted(set(rope) - allowed)
    if unknown:
        raise UserError(f"config.json: unsupported {f.name(key)} field(s) {unknown} for rope_type {rope_type!r}")
    theta_name = f"{f.name(key)}.rope_theta" if "rope_theta" in rope else f.name("rope_theta")
    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": _number(theta, theta_name)}
    if rope_type == "llama3":
        try:
            out.update(
                rope_factor=_number(rope["factor"], f"{f.name(key)}.factor"),
                rope_low_freq_factor=_number(rope["low_freq_factor"], f"{f.name(key)}.low_freq_factor"),
                rope_high_freq_factor=_number(rope["high_freq_factor"], f"{f.name(key)}.high_freq_factor"),
                rope_original_max_position=_integer(
                    rope.get("original_max_position_embeddings", f.d.get("max_position_embeddings", 8192)),
                    f"{f.name(key)}.original_max_position_embeddings",
                ),
            )
        except KeyError as e:
            raise UserError(f"config.json: missing field {f.name(key)}.{e.args[0]} for rope_type 'llama3'") from None
    return out


def _text_from_hf(d: Mapping[str, Any], where: str, *, family: str) -> TextConfig:
    """The decoder of a config.json section; `family`: "llama", "qwen2" or "mllama" (its text_config)."""
    f = _Fields(d, where)
    f.refuse_unless("hidden_act", ("silu",), "only SwiGLU with silu is implemented")
    if family == "qwen2":
        _qwen2_attention_from_hf(f)
    else:  # Qwen2 has no such fields (its q/k/v bias is implied): there they are unknown fields
        f.refuse_unless("attention_bias", (False,), "Llama 3 projections have no bias")
        f.refuse_unless("mlp_bias", (False,), "Llama 3 MLPs have no bias")
    if "quantization_config" in f.d:
        raise UserError(f"config.json: unsupported {f.name('quantization_config')}: load unquantised weights")
    mllama = family == "mllama"
    hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    head_dim = hidden // heads if mllama else f.integer("head_dim", hidden // heads)
    # Defaults where a field is absent: each family's transformers config class.
    max_position = {"llama": 2048, "qwen2": 32768, "mllama": 131072}[family]
    text = TextConfig(
        vocab_size=f.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=f.integer("intermediate_size"),
        num_layers=f.integer("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=f.integer("num_key_value_heads", heads),
        head_dim=head_dim,
        rms_norm_eps=f.number("rms_norm_eps", 1e-5 if mllama else 1e-6),
        max_position_embeddings=f.integer("max_position_embeddings", max_position),
        tie_word_embeddings=f.flag("tie_word_embeddings", False),
        qkv_bias=family == "qwen2",
        cross_attention_layers=f.integers("cross_attention_layers", (3, 8, 13, 18, 23, 28, 33, 38)) if mllama else (),
        extra_embeddings=8 if mllama else 0,
        bos_token_id=f.token_id("bos_token_id"),
        eos_token_id=f.token_id("eos_token_id", many=True),
        pad_token_id=f.token_id("pad_token_id"),
        **_rope_from_hf(f, 500000.0 if mllama else 10000.0),  # transformers: LlamaConfig and Qwen2Config 1e4
    )
    f.check_all_used()
    return text


def _qwen2_attention_from_hf(f: _Fields) -> None:
    """Qwen2's attention fields: full causal attention in every layer is all that is implemented.

    `sliding_window` and `max_window_layers` only act with `use_sliding_window` (false in every
    Qwen2.5 release, whose files still carry both numbers); transformers 5 writes the per-layer
    result as `layer_types`."""
    if f.flag("use_sliding_window", False):
        raise UserError(
            f"config.json: unsupported {f.name('use_sliding_window')}=true: sliding-window attention is not "
            "implemented (every Qwen2.5 release has it false)"
        )
    f.used |= {"sliding_window", "max_window_layers"}
    types = f.get("layer_types", [])
    if not isinstance(types, list) or any(t != "full_attention" for t in types):
        raise UserError(
            f"config.json: unsupported {f.name('layer_types')}={_short(types)}: only 'full_attention' layers "
            "are implemented"
        )
    f.refuse_unless("use_mrope", (False,), "multimodal RoPE is Qwen2-VL's")


def _vision_from_hf(d: Mapping[str, Any], where: str) -> VisionConfig:
    f = _Fields(d, where)
    f.refuse_unless("hidden_act", ("gelu",), "only exact (erf) GELU is implemented")
    heads = f.get("attention_heads", None) or f.get("num_attention_heads")
    f.used |= {
        "attention_heads",
        "num_attention_heads",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    }
    ratios = f.get("supported_aspect_ratios", DEFAULT_ASPECT_RATIOS)
    if not isinstance(ratios, list | tuple) or not all(
        isinstance(r, list | tuple) and len(r) == 2 and all(_is_int(x) and x > 0 for x in r) for r in ratios
    ):
        raise UserError(
            f"config.json: field {f.name('supported_aspect_ratios')!r} must be a list of [rows, columns] pairs "
            f"of positive integers, got {_short(ratios)}"
        )
    vision = VisionConfig(
        hidden_size=f.integer("hidden_size"),
        intermediate_size=f.integer("intermediate_size"),
        num_layers=f.integer("num_hidden_layers"),
        num_global_layers=f.integer("num_global_layers", positive=False),
        num_heads=_integer(heads, f.name("attention_heads")),
        num_channels=f.integer("num_channels", 3),
        image_size=f.integer("image_size"),
        patch_size=f.integer("patch_size"),
        norm_eps=f.number("norm_eps", 1e-5),
        max_num_tiles=f.integer("max_num_tiles", 4),
        intermediate_layers_indices=f.integers("intermediate_layers_indices", (3, 7, 15, 23, 30)),
        supported_aspect_ratios=tuple(tuple(r) for r in ratios),
    )
    out_dim = f.integer("vision_output_dim", vision.output_dim)
    if out_dim != vision.output_dim:
        raise UserError(
            f"config.json: {f.name('vision_output_dim')}={out_dim} but hidden_size * (1 + "
            f"len(intermediate_layers_indices)) = {vision.output_dim}"
        )
    if vision.image_size % vision.patch_size:
        raise UserError(f"config.json: {f.name('image_size')} must be a multiple of patch_size")
    f.check_all_used()
    return vision


def from_hf_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Our config from a Hugging Face config.json dict (old `rope_scaling` or transformers-5 style)."""
    if not isinstance(d, Mapping):
        raise UserError(f"config.json must be a JSON object, got a {type(d).__name__}")
    archs = d.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(f"config.json: field 'architectures' must be a list of names, got {_short(archs)}")
    model_type = d.get("model_type")
    known = {LlamaConfig.architecture: "llama", Qwen2Config.architecture: "qwen2", MllamaConfig.architecture: "mllama"}
    arch = next((a for a in archs if a in known), None)
    if arch is None and archs:
        raise UserError(
            f"config.json: unknown architecture {archs} (field 'architectures'); supported: {sorted(known)}"
        )
    kind = known[arch] if arch else model_type
    if kind in ("llama", "qwen2"):
        cls = Qwen2Config if kind == "qwen2" else LlamaConfig
        return cls(_text_from_hf(d, "", family=kind))
    if kind != "mllama":
        raise UserError(
            f"config.json: unknown model_type {model_type!r} and no supported 'architectures' "
            f"(supported: {sorted(known)})"
        )
    top = _Fields(d, "")
    text = _text_from_hf(top.get("text_config"), "text_config", family="mllama")
    vision = _vision_from_hf(top.get("vision_config"), "vision_config")
    image_token = top.integer("image_token_index", 128256)
    top.check_all_used()
    return MllamaConfig(text, vision, image_token_index=image_token)


def _text_to_hf(t: TextConfig, *, family: str) -> dict[str, Any]:
    d: dict[str, Any] = {
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "max_position_embeddings": t.max_position_embeddings,
        "rope_theta": t.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    if t.rope_type == "llama3":
        d["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": t.rope_factor,
            "low_freq_factor": t.rope_low_freq_factor,
            "high_freq_factor": t.rope_high_freq_factor,
            "original_max_position_embeddings": t.rope_original_max_position,
        }
    if family == "mllama":
        if t.head_dim * t.num_heads != t.hidden_size:
            raise UserError("Mllama requires head_dim * num_heads == hidden_size to be expressible in config.json")
        d["cross_attention_layers"] = list(t.cross_attention_layers)
        d["model_type"] = "mllama_text_model"
    elif family == "qwen2":
        # as the hub's files: head_dim only where it is not hidden_size // heads (older transformers
        # ignore it), no bias fields (the q/k/v bias is implied), sliding window off
        if t.head_dim * t.num_heads != t.hidden_size:
            d["head_dim"] = t.head_dim
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=t.num_layers, model_type="qwen2")
    else:
        d.update(head_dim=t.head_dim, attention_bias=False, mlp_bias=False, model_type="llama")
    return d


def to_hf_dict(config: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json in the layout of the hub's files (`rope_scaling` + `rope_theta`), which both older
    transformers and transformers 5 read. The two semantic flags are not HF fields and are not written."""
    if isinstance(config, LlamaConfig):  # Qwen2Config too
        family = "qwen2" if isinstance(config, Qwen2Config) else "llama"
        return {"architectures": [config.architecture], **_text_to_hf(config.text, family=family), "torch_dtype": dtype}
    v = config.vision
    vision = {
        "model_type": "mllama_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers,
        "num_global_layers": v.num_global_layers,
        "attention_heads": v.num_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "norm_eps": v.norm_eps,
        "max_num_tiles": v.max_num_tiles,
        "intermediate_layers_indices": list(v.intermediate_layers_indices),
        "supported_aspect_ratios": [list(r) for r in v.supported_aspect_ratios],
        "vision_output_dim": v.output_dim,
        "hidden_act": "gelu",
    }
    return {
        "architectures": [config.architecture],
        "model_type": "mllama",
        "image_token_index": config.image_token_index,
        "text_config": _text_to_hf(config.text, family="mllama"),
        "vision_config": vision,
        "torch_dtype": dtype,
    }

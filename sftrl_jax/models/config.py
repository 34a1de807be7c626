"""Model configs: frozen dataclasses with presets (Hugging Face config.json: `models.hf_config`).

`TextConfig` describes the Llama-3 decoder (shared by `LlamaForCausalLM` and Mllama's language
model), `VisionConfig` Mllama's vision encoder. `LlamaConfig` and `MllamaConfig` are the two model
configs. Field comments give the Hugging Face name.

Two config flags choose between Meta's reference code (what the released weights were trained
with, the default) and transformers >= 4.56 (see docs/MODELS.md):
`VisionConfig.intermediate_layer_features` and `TextConfig.cross_attention_zero_imageless_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from sftrl_jax.errors import UserError

DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Llama-3 decoder. With `cross_attention_layers` non-empty it is Mllama's language model."""

    vocab_size: int = 128256  # vocab_size (lm_head rows)
    hidden_size: int = 4096  # hidden_size, D
    intermediate_size: int = 14336  # intermediate_size, F
    num_layers: int = 40  # num_hidden_layers
    num_heads: int = 32  # num_attention_heads, N
    num_kv_heads: int = 8  # num_key_value_heads, K
    head_dim: int = 128  # head_dim (Mllama: hidden_size // num_attention_heads), H
    rms_norm_eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 500000.0  # rope_theta / rope_parameters.rope_theta
    rope_type: Literal["default", "llama3"] = "llama3"  # rope_scaling.rope_type
    rope_factor: float = 8.0  # rope_scaling.factor
    rope_low_freq_factor: float = 1.0  # rope_scaling.low_freq_factor
    rope_high_freq_factor: float = 4.0  # rope_scaling.high_freq_factor
    rope_original_max_position: int = 8192  # rope_scaling.original_max_position_embeddings
    max_position_embeddings: int = 131072  # max_position_embeddings
    tie_word_embeddings: bool = False  # tie_word_embeddings (lm_head = embed_tokens[:vocab_size])
    # Mllama only: layer indices that are gated cross-attention layers, and the extra embedding rows
    # (Mllama's embed_tokens has vocab_size + 8 rows; the image token is row vocab_size).
    cross_attention_layers: tuple[int, ...] = ()  # cross_attention_layers
    extra_embeddings: int = 0
    # Text rows that see no image tile (before the first <|image|>): True = Meta, their cross-attention
    # output is zeroed too; False = transformers, only the cross-attention MLP output is zeroed.
    cross_attention_zero_imageless_rows: bool = True
    bos_token_id: int | None = 128000  # bos_token_id
    eos_token_id: int | tuple[int, ...] | None = 128001  # eos_token_id
    pad_token_id: int | None = None  # pad_token_id

    def __post_init__(self):
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads", self)
        _check(self.head_dim % 2 == 0, "head_dim must be even (RoPE)", self)
        _check(self.rope_type in ("default", "llama3"), f"unsupported rope_type {self.rope_type!r}", self)
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
        _check(not bad, f"cross_attention_layers {bad} outside [0, {self.num_layers})", self)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "cross_attention_layers", tuple(self.cross_attention_layers))

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size + self.extra_embeddings

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.cross_attention_layers)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Mllama vision encoder (per tile ViT-H/14 + gated global layers)."""

    hidden_size: int = 1280  # hidden_size
    intermediate_size: int = 5120  # intermediate_size
    num_layers: int = 32  # num_hidden_layers (local layers)
    num_global_layers: int = 8  # num_global_layers
    num_heads: int = 16  # attention_heads
    num_channels: int = 3  # num_channels
    image_size: int = 560  # image_size (tile side in pixels)
    patch_size: int = 14  # patch_size
    norm_eps: float = 1e-5  # norm_eps
    max_num_tiles: int = 4  # max_num_tiles
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)  # intermediate_layers_indices
    supported_aspect_ratios: tuple[tuple[int, int], ...] = DEFAULT_ASPECT_RATIOS  # supported_aspect_ratios
    # Which feature `intermediate_layers_indices[j] = i` picks: "input" of local layer i (Meta's
    # reference and transformers <= 4.54, what the released weights were trained with) or its
    # "output" (transformers >= 4.56).
    intermediate_layer_features: Literal["input", "output"] = "input"

    def __post_init__(self):
        object.__setattr__(self, "intermediate_layers_indices", tuple(self.intermediate_layers_indices))
        object.__setattr__(self, "supported_aspect_ratios", tuple(tuple(r) for r in self.supported_aspect_ratios))
        _check(self.hidden_size % self.num_heads == 0, "hidden_size must be a multiple of attention_heads", self)
        _check(self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size", self)
        _check(
            self.intermediate_layer_features in ("input", "output"),
            "intermediate_layer_features must be 'input' or 'output'",
            self,
        )
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_layers]
        _check(not bad, f"intermediate_layers_indices {bad} outside [0, {self.num_layers})", self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Tokens per tile: patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def num_aspect_ratios(self) -> int:
        """Rows of the tile embedding tables: id 0 = padding image, then one per supported ratio."""
        return len(self.supported_aspect_ratios) + 1

    @property
    def output_dim(self) -> int:
        """vision_output_dim: final features concatenated with the intermediate ones."""
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """`LlamaForCausalLM` (Llama 3 / 3.1 / 3.2 text models)."""

    text: TextConfig = dataclasses.field(default_factory=TextConfig)

    architecture = "LlamaForCausalLM"

    @classmethod
    def llama_3_2_1b(cls) -> LlamaConfig:
        return cls(
            TextConfig(
                hidden_size=2048,
                intermediate_size=8192,
                num_layers=16,
                num_heads=32,
                num_kv_heads=8,
                head_dim=64,
                rope_factor=32.0,
                tie_word_embeddings=True,
                eos_token_id=(128001, 128008, 128009),
            )
        )

    @classmethod
    def llama_3_2_3b(cls) -> LlamaConfig:
        return cls(
            TextConfig(
                hidden_size=3072,
                intermediate_size=8192,
                num_layers=28,
                num_heads=24,
                num_kv_heads=8,
                head_dim=128,
                rope_factor=32.0,
                tie_word_embeddings=True,
                eos_token_id=(128001, 128008, 128009),
            )
        )

    @classmethod
    def tiny(cls, **text_overrides) -> LlamaConfig:
        """A few-hundred-thousand-parameter Llama for CPU tests (GQA, llama3 RoPE scaling)."""
        text = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            rope_original_max_position=64,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        text.update(text_overrides)
        return cls(TextConfig(**text))


@dataclasses.dataclass(frozen=True)
class MllamaConfig:
    """`MllamaForConditionalGeneration` (Llama 3.2 Vision)."""

    text: TextConfig = dataclasses.field(
        default_factory=lambda: TextConfig(
            cross_attention_layers=(3, 8, 13, 18, 23, 28, 33, 38), extra_embeddings=8, pad_token_id=128004
        )
    )
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_index: int = 128256  # image_token_index

    architecture = "MllamaForConditionalGeneration"

    def __post_init__(self):
        _check(bool(self.text.cross_attention_layers), "Mllama needs cross_attention_layers", self)

    @classmethod
    def llama_3_2_11b_vision(cls) -> MllamaConfig:
        """Llama-3.2-11B-Vision(-Instruct): 10,670,220,835 parameters."""
        return cls()

    @classmethod
    def tiny(cls, **text_overrides) -> MllamaConfig:
        """Tiny Mllama for CPU tests: 4 text layers (1 and 3 cross-attention), 28-px tiles of 2x2 patches."""
        text = dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            rope_original_max_position=64,
            max_position_embeddings=512,
            cross_attention_layers=(1, 3),
            extra_embeddings=8,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        text.update(text_overrides)
        vision = VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_layers=4,
            num_global_layers=2,
            num_heads=2,
            image_size=28,
            patch_size=14,
            intermediate_layers_indices=(1, 3),
        )
        return cls(TextConfig(**text), vision, image_token_index=256)

    def with_transformers_semantics(self) -> MllamaConfig:
        """The same model under transformers >= 4.56 semantics (used by parity tests)."""
        return dataclasses.replace(
            self,
            text=dataclasses.replace(self.text, cross_attention_zero_imageless_rows=False),
            vision=dataclasses.replace(self.vision, intermediate_layer_features="output"),
        )


ModelConfig = LlamaConfig | MllamaConfig


def _check(ok: bool, message: str, config) -> None:
    if not ok:
        raise UserError(f"{type(config).__name__}: {message}")


# --------------------------------------------------------------------------------------------------
# Our own JSON (stored beside orbax checkpoints): every field, including the two semantic flags.


def to_dict(config: ModelConfig) -> dict[str, Any]:
    return {"architecture": config.architecture, **dataclasses.asdict(config)}


def from_dict(d: Mapping[str, Any]) -> ModelConfig:
    d = dict(d)
    arch = d.pop("architecture", None)
    try:
        if arch == LlamaConfig.architecture:
            return LlamaConfig(TextConfig(**d["text"]))
        if arch == MllamaConfig.architecture:
            return MllamaConfig(
                TextConfig(**d["text"]), VisionConfig(**d["vision"]), image_token_index=d["image_token_index"]
            )
    except TypeError as e:
        raise UserError(f"model config: {e}") from None
    raise UserError(f"model config: unknown architecture {arch!r}")


# Hugging Face config.json <-> ours lives in its own module; re-exported here (the names users and
# `convert` call: `config.from_hf_dict`, `config.to_hf_dict`).
from sftrl_jax.models.hf_config import from_hf_dict, to_hf_dict  # noqa: E402

__all__ = [
    "DEFAULT_ASPECT_RATIOS",
    "LlamaConfig",
    "MllamaConfig",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "from_dict",
    "from_hf_dict",
    "to_dict",
    "to_hf_dict",
]

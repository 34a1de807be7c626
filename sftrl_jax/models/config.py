"""Model configs: frozen dataclasses with presets (Hugging Face config.json: `models.hf_config`).

`TextConfig` describes the Llama-3 decoder (shared by `LlamaForCausalLM`, `Qwen2ForCausalLM` and
Mllama's language model), `VisionConfig` Mllama's vision encoder. `LlamaConfig`, `Qwen2Config` and
`MllamaConfig` are the model configs: `Qwen2Config` is a `LlamaConfig` (the same decoder, one
forward) whose family, and so its config.json and class name, is Qwen2; what the math needs
(q/k/v bias, RoPE theta, tied head) is in `TextConfig`. Field comments give the Hugging Face name.

Two config flags choose between Meta's reference code (what the released weights were trained
with, the default) and transformers >= 4.56 (see docs/MODELS.md):
`VisionConfig.intermediate_layer_features` and `TextConfig.cross_attention_zero_imageless_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from sftrl_jax import config as config_lib
from sftrl_jax.errors import UserError

DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))

# Sizes are bounded before anything is built (a config.json with 10**6 layers or a 10**12 vocabulary
# is refused in a line, instead of the planner or loader growing for minutes): each field far above
# any released model's (Llama 3.1 405B: hidden 16384, MLP 53248, 126 layers, 128 heads; vocabularies
# up to ~262k), and the whole model at most MAX_PARAMS parameters.
MAX_PARAMS = 2 * 10**12
_TEXT_RANGES = dict(
    vocab_size="[1, 4194304]",  # 2**22
    hidden_size="[1, 65536]",
    intermediate_size="[1, 524288]",
    num_layers="[1, 1024]",
    num_heads="[1, 1024]",
    num_kv_heads="[1, 1024]",
    head_dim="[2, 4096]",
    rms_norm_eps="(0, 1]",
    rope_theta="(0, inf)",
    rope_factor="(0, inf)",
    rope_low_freq_factor="(0, inf)",
    rope_high_freq_factor="(0, inf)",
    rope_original_max_position="[1, 16777216]",  # 2**24 positions
    max_position_embeddings="[1, 16777216]",
    extra_embeddings="[0, 1024]",
)
_VISION_RANGES = dict(
    hidden_size="[1, 65536]",
    intermediate_size="[1, 524288]",
    num_layers="[1, 1024]",
    num_global_layers="[0, 1024]",
    num_heads="[1, 1024]",
    num_channels="[1, 16]",
    image_size="[1, 8192]",
    patch_size="[1, 8192]",
    norm_eps="(0, 1]",
    max_num_tiles="[1, 64]",
)
# field -> its config.json name, where the two differ (named in the error too)
_HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "rope_factor": "rope_scaling.factor",
    "rope_low_freq_factor": "rope_scaling.low_freq_factor",
    "rope_high_freq_factor": "rope_scaling.high_freq_factor",
    "rope_original_max_position": "rope_scaling.original_max_position_embeddings",
}


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
    # Bias on the q, k and v projections (not o): Qwen2 always (no config.json field). Llama's
    # `attention_bias` would also bias o_proj: not implemented, refused.
    qkv_bias: bool = False
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
        _check_ranges(self, _TEXT_RANGES)
        _check(self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads", self)
        _check(self.head_dim % 2 == 0, "head_dim must be even (RoPE)", self)
        _check(self.rope_type in ("default", "llama3"), f"unsupported rope_type {self.rope_type!r}", self)
        if self.rope_type == "llama3":  # the smooth band divides by their difference
            _check(
                self.rope_high_freq_factor > self.rope_low_freq_factor,
                f"rope_high_freq_factor ({self.rope_high_freq_factor}) must exceed rope_low_freq_factor "
                f"({self.rope_low_freq_factor})",
                self,
            )
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
        _check(not bad, f"cross_attention_layers {bad[:8]} outside [0, {self.num_layers})", self)
        layers = list(self.cross_attention_layers)
        _check(len(set(layers)) == len(layers), f"cross_attention_layers repeat a layer: {layers[:16]}", self)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "cross_attention_layers", tuple(self.cross_attention_layers))
        _check_params(approx_params(self), self)

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
        _check_ranges(self, _VISION_RANGES)
        object.__setattr__(self, "intermediate_layers_indices", tuple(self.intermediate_layers_indices))
        object.__setattr__(self, "supported_aspect_ratios", tuple(tuple(r) for r in self.supported_aspect_ratios))
        ratios = self.supported_aspect_ratios
        _check(1 <= len(ratios) <= 1024, f"supported_aspect_ratios must list 1 to 1024 pairs, got {len(ratios)}", self)
        for r in ratios:
            _check(
                len(r) == 2 and all(_in_range(x, "[1, 64]") for x in r),
                f"supported_aspect_ratios must be [rows, columns] pairs of integers in [1, 64], got {r!r:.60}",
                self,
            )
        indices = list(self.intermediate_layers_indices)
        _check(len(set(indices)) == len(indices), f"intermediate_layers_indices repeat a layer: {indices[:16]}", self)
        _check(self.hidden_size % self.num_heads == 0, "hidden_size must be a multiple of attention_heads", self)
        _check(self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size", self)
        _check(
            self.intermediate_layer_features in ("input", "output"),
            "intermediate_layer_features must be 'input' or 'output'",
            self,
        )
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_layers]
        _check(not bad, f"intermediate_layers_indices {bad[:8]} outside [0, {self.num_layers})", self)
        _check_params(approx_params(self), self)

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
    qkv_bias = False  # what the family's config.json implies for `text.qkv_bias`

    def __post_init__(self):
        _check(
            self.text.qkv_bias == self.qkv_bias,
            f"{self.architecture} has {'' if self.qkv_bias else 'no '}q/k/v bias: text.qkv_bias must be "
            f"{self.qkv_bias}",
            self,
        )

    @classmethod
    def llama_3_2_1b(cls) -> LlamaConfig:
        return cls._llama_3_2(hidden_size=2048, num_layers=16, num_heads=32, head_dim=64)

    @classmethod
    def llama_3_2_3b(cls) -> LlamaConfig:
        return cls._llama_3_2(hidden_size=3072, num_layers=28, num_heads=24, head_dim=128)

    @classmethod
    def _llama_3_2(cls, **sizes) -> LlamaConfig:
        """Llama 3.2 1B / 3B: what the two share (8 kv heads, MLP 8192, tied embeddings, RoPE x32)."""
        return cls(
            TextConfig(
                intermediate_size=8192,
                num_kv_heads=8,
                rope_factor=32.0,
                tie_word_embeddings=True,
                eos_token_id=(128001, 128008, 128009),
                **sizes,
            )
        )

    @classmethod
    def tiny(cls, **text_overrides) -> LlamaConfig:
        """A few-hundred-thousand-parameter Llama for CPU tests (GQA, llama3 RoPE scaling)."""
        return cls(TextConfig(**{**_TINY_TEXT, "num_layers": 2, **text_overrides}))


# What Qwen2 changes in the Llama decoder (every Qwen2.5 size and the tiny preset).
_QWEN2 = dict(qkv_bias=True, rms_norm_eps=1e-6, rope_type="default", rope_theta=1000000.0)
# Qwen2.5 sizes, from the hub's config.json of Qwen/Qwen2.5-{size}-Instruct.
_QWEN2_5_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")
QWEN2_5_SIZES = {  # size -> (D, F, layers, N, K, V), tied head; parameters
    "0.5b": ((896, 4864, 24, 14, 2, 151936), True),  # 494,032,768
    "1.5b": ((1536, 8960, 28, 12, 2, 151936), True),  # 1,543,714,304
    "3b": ((2048, 11008, 36, 16, 2, 151936), True),  # 3,085,938,688
    "7b": ((3584, 18944, 28, 28, 4, 152064), False),  # 7,615,616,512
}


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    """`Qwen2ForCausalLM` (Qwen2 / Qwen2.5 causal LMs): the Llama decoder with bias on q/k/v, RoPE
    theta 1e6 without scaling, RMSNorm eps 1e-6. Sliding-window attention (`use_sliding_window`,
    off in every Qwen2.5 release) is not implemented and refused when a config.json turns it on."""

    text: TextConfig = dataclasses.field(default_factory=lambda: Qwen2Config.qwen2_5("7b").text)

    architecture = "Qwen2ForCausalLM"
    qkv_bias = True

    @classmethod
    def qwen2_5(cls, size: str) -> Qwen2Config:
        """Qwen2.5-{size}(-Instruct), `size` one of `QWEN2_5_SIZES`: "0.5b", "1.5b", "3b", "7b"."""
        if size not in QWEN2_5_SIZES:
            raise UserError(f"Qwen2.5 comes in sizes {', '.join(QWEN2_5_SIZES)}, not {size!r}")
        sizes, tied = QWEN2_5_SIZES[size]
        text = dict(zip(_QWEN2_5_FIELDS, sizes, strict=True), head_dim=sizes[0] // sizes[3], tie_word_embeddings=tied)
        tokens = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=None)  # <|endoftext|>, <|im_end|>
        return cls(TextConfig(**_QWEN2, **text, **tokens, max_position_embeddings=32768))

    @classmethod
    def tiny(cls, **text_overrides) -> Qwen2Config:
        """A tiny Qwen2.5 for CPU tests: the tiny Llama's sizes with q/k/v bias, theta 1e6, tied head."""
        text = {k: v for k, v in _TINY_TEXT.items() if k != "rope_original_max_position"}  # llama3 RoPE only
        return cls(TextConfig(**{**text, "num_layers": 2, **_QWEN2, "tie_word_embeddings": True, **text_overrides}))


# The text decoder of the tiny presets (CPU tests).
_TINY_TEXT = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
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
        _check(not self.text.qkv_bias, "Mllama has no q/k/v bias: text.qkv_bias must be False", self)
        _check_params(approx_params(self.text) + approx_params(self.vision), self)

    @classmethod
    def llama_3_2_11b_vision(cls) -> MllamaConfig:
        """Llama-3.2-11B-Vision(-Instruct): 10,670,220,835 parameters."""
        return cls()

    @classmethod
    def tiny(cls, **text_overrides) -> MllamaConfig:
        """Tiny Mllama for CPU tests: 4 text layers (1 and 3 cross-attention), 28-px tiles of 2x2 patches."""
        text = {**_TINY_TEXT, "num_layers": 4, "cross_attention_layers": (1, 3), "extra_embeddings": 8}
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


ModelConfig = LlamaConfig | Qwen2Config | MllamaConfig


def _check(ok: bool, message: str, config) -> None:
    if not ok:
        raise UserError(f"{type(config).__name__}: {message}")


def _check_ranges(config, ranges: Mapping[str, str]) -> None:
    try:
        config_lib.check_ranges(config, **ranges)
    except config_lib.RangeError as e:
        hf = f" (config.json: {_HF_NAMES[e.key]})" if e.key in _HF_NAMES else ""
        raise UserError(f"{type(config).__name__}: {e.key}{hf} must be {e.rule}, got {e.shown}") from None


def _in_range(value, interval: str) -> bool:
    try:
        config_lib.check_range("", value, interval)
    except config_lib.RangeError:
        return False
    return True


def approx_params(config: TextConfig | VisionConfig) -> int:
    """Parameters of a text decoder or vision encoder from its sizes alone (within a few percent:
    the size guard's count; `build.param_count` gives the exact one)."""
    if isinstance(config, TextConfig):
        t = config
        D, F, H, N, K = t.hidden_size, t.intermediate_size, t.head_dim, t.num_heads, t.num_kv_heads
        embed = (t.num_embeddings + (0 if t.tie_word_embeddings else t.vocab_size)) * D
        bias = (N + 2 * K) * H if t.qkv_bias else 0
        return embed + t.num_layers * (2 * D * H * (N + K) + 3 * D * F + 2 * D + bias) + D
    v = config
    D, P = v.hidden_size, v.num_patches
    tiles = v.num_aspect_ratios * v.max_num_tiles
    layers = (v.num_layers + v.num_global_layers) * (4 * D * D + 2 * D * v.intermediate_size + 4 * D)
    return v.num_channels * v.patch_size**2 * D + P * D * (1 + tiles) + tiles * D + layers


def _check_params(n: int, config) -> None:
    _check(
        n <= MAX_PARAMS,
        f"about {n:.3g} parameters, more than the {MAX_PARAMS:.0e} this package builds (a typo in a size?)",
        config,
    )


# --------------------------------------------------------------------------------------------------
# Our own JSON (stored beside orbax checkpoints): every field, including the two semantic flags.


def to_dict(config: ModelConfig) -> dict[str, Any]:
    return {"architecture": config.architecture, **dataclasses.asdict(config)}


def from_dict(d: Mapping[str, Any]) -> ModelConfig:
    d = dict(d)
    arch = d.pop("architecture", None)
    try:
        for cls in (LlamaConfig, Qwen2Config):
            if arch == cls.architecture:
                return cls(TextConfig(**d["text"]))
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
    "QWEN2_5_SIZES",
    "Qwen2Config",
    "TextConfig",
    "VisionConfig",
    "from_dict",
    "from_hf_dict",
    "to_dict",
    "to_hf_dict",
]

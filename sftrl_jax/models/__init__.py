"""Llama 3.2 Vision (Mllama), Llama 3 and Qwen2.5 text models in Flax NNX, with HF conversion both ways."""

from sftrl_jax.models.build import abstract_model, create_model, model_class, param_count, per_device_bytes
from sftrl_jax.models.checkpoint import load_checkpoint, save_checkpoint
from sftrl_jax.models.config import (
    LlamaConfig,
    MllamaConfig,
    ModelConfig,
    Qwen2Config,
    TextConfig,
    VisionConfig,
    from_hf_dict,
    to_hf_dict,
)
from sftrl_jax.models.convert import from_pretrained, read_config, save_pretrained
from sftrl_jax.models.kv_cache import KVCache, init_cache
from sftrl_jax.models.mllama import MllamaForConditionalGeneration
from sftrl_jax.models.text import LlamaForCausalLM, ModelOutput, Qwen2ForCausalLM

__all__ = [
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MllamaConfig",
    "MllamaForConditionalGeneration",
    "ModelConfig",
    "ModelOutput",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "TextConfig",
    "VisionConfig",
    "abstract_model",
    "create_model",
    "from_hf_dict",
    "from_pretrained",
    "init_cache",
    "load_checkpoint",
    "model_class",
    "param_count",
    "per_device_bytes",
    "read_config",
    "save_checkpoint",
    "save_pretrained",
    "to_hf_dict",
]

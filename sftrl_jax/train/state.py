"""Train state and where a run's model comes from (preset, HF folder or orbax checkpoint).

`TrainState` is a plain pytree (step, params, opt_state, rng key data) so that it can be jitted,
donated, sharded and checkpointed as one object. `params` is the model's `nnx.State` of
`nnx.Param`s; the model's other variables (if any) and its graph definition stay outside.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sftrl_jax.config import ConfigError
from sftrl_jax.errors import UserError

PRESETS = (
    "llama-tiny",
    "mllama-tiny",
    "qwen2.5-tiny",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.2-11b-vision",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps done
    params: Any  # nnx.State of the trainable model parameters
    opt_state: Any  # optax state
    rng: jax.Array  # uint32 raw key data (typed keys do not checkpoint)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model a run trains. Exactly one of `init` (a folder) or `preset` (random init)."""

    init: str | None = None  # HF checkpoint folder (config.json + safetensors) or orbax ckpt (`sftrl convert`)
    preset: str | None = None  # random init: one of PRESETS (llama-tiny, mllama-tiny, qwen2.5-tiny, full sizes)
    text_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # preset TextConfig fields
    tokenizer: str | None = None  # tokenizer folder; None = the init folder's, else the shipped small one
    param_dtype: str = "float32"
    dtype: str | None = None  # compute dtype (bfloat16 on accelerators); None = param_dtype
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    # Each layer stack stored stacked and run as one jax.lax.scan in every pass (the models'
    # `scan_layers`): compile time and cross-layer memory independent of depth (11B recipes).
    scan_layers: bool = False

    def __post_init__(self):
        if (self.init is None) == (self.preset is None):
            raise ConfigError("model: give exactly one of model.init (a checkpoint folder) or model.preset")
        if self.preset is not None and self.preset not in PRESETS:
            import difflib

            close = difflib.get_close_matches(self.preset, PRESETS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"model.preset {self.preset!r} is unknown{hint}; presets: {', '.join(PRESETS)}")
        for name in ("param_dtype", "dtype"):
            value = getattr(self, name)
            if value is not None and value not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.{name} must be float32, bfloat16 or float16, got {value!r}")


def preset_config(name: str, text_overrides: dict[str, Any] | None = None):
    from sftrl_jax.models import config as mc

    overrides = dict(text_overrides or {})
    fields = {f.name for f in dataclasses.fields(mc.TextConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"model.text_overrides: unknown TextConfig field(s) {unknown}; fields: {', '.join(sorted(fields))}"
        )
    tiny = {"llama-tiny": mc.LlamaConfig, "mllama-tiny": mc.MllamaConfig, "qwen2.5-tiny": mc.Qwen2Config}
    if name in tiny:
        return tiny[name].tiny(**overrides)
    if name.startswith("qwen2.5-"):
        base = mc.Qwen2Config.qwen2_5(name.removeprefix("qwen2.5-"))
    else:
        base = {
            "llama-3.2-1b": mc.LlamaConfig.llama_3_2_1b,
            "llama-3.2-3b": mc.LlamaConfig.llama_3_2_3b,
            "llama-3.2-11b-vision": mc.MllamaConfig.llama_3_2_11b_vision,
        }[name]()
    if overrides:
        base = dataclasses.replace(base, text=dataclasses.replace(base.text, **overrides))
    return base


def tokenizer_for(section: ModelSection):
    from sftrl_jax.data.tokenizer import load_tokenizer

    if section.tokenizer is not None:
        return load_tokenizer(section.tokenizer)
    if section.init is not None:
        for folder in (section.init, os.path.join(section.init, "hf")):
            if os.path.exists(os.path.join(folder, "tokenizer_config.json")):
                return load_tokenizer(folder)
    if section.preset is not None and section.preset.startswith("qwen"):  # Qwen2.5 chats in ChatML
        from sftrl_jax.data.tokenizer import default_tokenizer_path

        return load_tokenizer(default_tokenizer_path("chatml"))
    return load_tokenizer()


def load_model(section: ModelSection, *, mesh=None, seed: int = 0):
    """The run's model, created or loaded directly into its shardings on `mesh`."""
    from sftrl_jax import models
    from sftrl_jax.models import build

    param_dtype = jnp.dtype(section.param_dtype)
    dtype = jnp.dtype(section.dtype) if section.dtype else None
    kw = dict(mesh=mesh, remat=section.remat, scan_layers=section.scan_layers)
    if section.preset is not None:
        cfg = preset_config(section.preset, section.text_overrides)
        return build.create_model(cfg, param_dtype=param_dtype, dtype=dtype, seed=seed, **kw)
    path = section.init
    if not os.path.exists(path):
        raise ConfigError(f"model.init {path!r} does not exist")
    if os.path.exists(os.path.join(path, "config.json")):
        return models.from_pretrained(path, dtype=param_dtype, compute_dtype=dtype, **kw)
    from sftrl_jax.models.checkpoint import load_checkpoint

    return load_checkpoint(path, dtype=param_dtype, compute_dtype=dtype, **kw)


def split_params(model: nnx.Module):
    """(graphdef, params, rest): the trainable `nnx.Param`s apart from any other variables."""
    return nnx.split(model, nnx.Param, ...)


def rng_data(seed: int) -> jax.Array:
    return jax.random.key_data(jax.random.key(seed))


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: the restore target of a checkpoint."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def load_for_eval(ckpt: str, task: str, tokenizer_path: str | None = None):
    """(model, tokenizer, image processor) of a checkpoint, checked against the task."""
    from sftrl_jax.data.processor import for_model

    if not os.path.isdir(ckpt):
        raise UserError(f"checkpoint {ckpt!r} does not exist")
    if not (
        os.path.exists(os.path.join(ckpt, "config.json")) or os.path.exists(os.path.join(ckpt, "model_config.json"))
    ):
        raise UserError(f"{ckpt!r} is neither our checkpoint (model_config.json) nor an HF folder (config.json)")
    section = ModelSection(init=ckpt, tokenizer=tokenizer_path)
    model = load_model(section)
    proc = for_model(model)
    if task.endswith("-vl") and proc is None:
        raise UserError(
            f"task {task} shows images, but {ckpt} is a text-only {type(model).__name__}; "
            f"use an Mllama (vision) checkpoint or the -l task"
        )
    tokenizer = tokenizer_for(section)
    if tokenizer.vocab_size > model.config.text.num_embeddings:
        raise UserError(
            f"the tokenizer ({tokenizer.vocab_size} ids) does not fit the model's "
            f"{model.config.text.num_embeddings} embeddings: pass the checkpoint's tokenizer with --tokenizer"
        )
    return model, tokenizer, proc

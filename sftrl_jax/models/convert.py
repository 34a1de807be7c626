"""Hugging Face checkpoints <-> our models, through ONE declarative key table used both ways.

Each rule pairs an HF key with one of our parameter paths (layer rules: under `layers.{i}.`) and a
layout transform. Loading is strict: every key in the files is consumed, every parameter filled, every
shape checked; errors name the file, key or config field. Tensors are streamed one at a time from
memory-mapped safetensors (numpy, never torch) straight into their shardings. A model with stacked
layers (`scan_layers`) is filled stack by stack (`stacking.locate`: layer i is slice i // p of stack
i % p) and written layer by layer, so its HF files are the per-layer model's.

Mllama checkpoints come in two key layouts: the hub's (`language_model.model.layers...`,
`language_model.lm_head`, `vision_model...`, `multi_modal_projector...`, also what transformers 5
writes) and the one transformers 4.52-4.57 wrote (`model.language_model.layers...`, `lm_head`,
`model.vision_model...`, `model.multi_modal_projector...`). Both load; we write the hub's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sftrl_jax import integrity
from sftrl_jax.errors import UserError
from sftrl_jax.models import build, safetensors_io, stacking
from sftrl_jax.models import config as config_lib
from sftrl_jax.parallel import placement

# --------------------------------------------------------------------------------------------------
# Layout transforms between an HF tensor and our parameter.


@dataclasses.dataclass(frozen=True)
class Copy:
    """Same shape and layout."""

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return ours

    def to_ours(self, a: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
        return a

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        return a


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch Linear weight [out, in] <-> our kernel [*in_dims, *out_dims] (`n_in` leading dims are
    the input, e.g. q_proj [D, N, H] has n_in=1, o_proj [N, H, D] has n_in=2)."""

    n_in: int = 1

    def hf_shape(self, ours):
        return (math.prod(ours[self.n_in :]), math.prod(ours[: self.n_in]))

    def to_ours(self, a, ours):
        return a.T.reshape(ours)

    def to_hf(self, a):
        return a.reshape(math.prod(a.shape[: self.n_in]), -1).T


@dataclasses.dataclass(frozen=True)
class FlattenTail:
    """HF [R, C * P * D] (an nn.Embedding of flattened tables) <-> ours [R, C, P, D]."""

    def hf_shape(self, ours):
        return (ours[0], math.prod(ours[1:]))

    def to_ours(self, a, ours):
        return a.reshape(ours)

    def to_hf(self, a):
        return a.reshape(a.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class Conv:
    """torch Conv2d weight [D, C, p, p] <-> ours [C, p, p, D]."""

    def hf_shape(self, ours):
        return (ours[3], ours[0], ours[1], ours[2])

    def to_ours(self, a, ours):
        return a.transpose(1, 2, 3, 0)

    def to_hf(self, a):
        return a.transpose(3, 0, 1, 2)


@dataclasses.dataclass(frozen=True)
class Flatten:
    """HF [N * H] (a torch Linear's bias) <-> ours [N, H]."""

    def hf_shape(self, ours):
        return (math.prod(ours),)

    def to_ours(self, a, ours):
        return a.reshape(ours)

    def to_hf(self, a):
        return a.reshape(-1)


COPY, LINEAR, LINEAR_OUT, FLAT, CONV, FLATTEN = Copy(), Linear(1), Linear(2), FlattenTail(), Conv(), Flatten()

# --------------------------------------------------------------------------------------------------
# The table: (HF key, our path, transform), grouped by where it repeats. Layer rules are relative to
# `layers.{i}.` (`_expand` adds it).


def _norm(name: str, bias: bool = False) -> tuple:
    """An RMSNorm (weight -> scale) or, with `bias`, a LayerNorm."""
    return ((f"{name}.weight", f"{name}.scale", COPY),) + (((f"{name}.bias", f"{name}.bias", COPY),) if bias else ())


def _linear(*names: str, transform=LINEAR) -> tuple:
    return tuple((f"{name}.weight", name, transform) for name in names)


def _attention(name: str) -> tuple:
    return _linear(f"{name}.q_proj", f"{name}.k_proj", f"{name}.v_proj") + _linear(
        f"{name}.o_proj", transform=LINEAR_OUT
    )


def _copy(*names: str) -> tuple:
    return tuple((name, name, COPY) for name in names)


SWIGLU = _linear("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TEXT_SELF_LAYER = _norm("input_layernorm") + _attention("self_attn") + _norm("post_attention_layernorm") + SWIGLU
QKV_BIAS = tuple((f"self_attn.{p}_proj.bias", f"self_attn.{p}_bias", FLATTEN) for p in "qkv")  # Qwen2
TEXT_CROSS_LAYER = (
    _norm("input_layernorm")
    + _attention("cross_attn")
    + _norm("cross_attn.q_norm")
    + _norm("cross_attn.k_norm")
    + _copy("cross_attn_attn_gate")
    + _norm("post_attention_layernorm")
    + SWIGLU
    + _copy("cross_attn_mlp_gate")
)
TEXT_MODEL = (("embed_tokens.weight", "embed_tokens", COPY),) + _norm("norm")
VISION_LAYER = (
    _norm("input_layernorm", bias=True)
    + _attention("self_attn")
    + _norm("post_attention_layernorm", bias=True)
    + (("mlp.fc1.weight", "mlp.fc1.kernel", LINEAR), ("mlp.fc1.bias", "mlp.fc1.bias", COPY))
    + (("mlp.fc2.weight", "mlp.fc2.kernel", LINEAR), ("mlp.fc2.bias", "mlp.fc2.bias", COPY))
)
VISION_GLOBAL_LAYER = VISION_LAYER + _copy("gate_attn", "gate_ffn")
VISION_MODEL = (
    ("patch_embedding.weight", "patch_embedding", CONV),
    ("class_embedding", "class_embedding", COPY),
    ("pre_tile_positional_embedding.embedding.weight", "pre_tile_positional_embedding.embedding", FLAT),
    ("pre_tile_positional_embedding.gate", "pre_tile_positional_embedding.gate", COPY),
    ("gated_positional_embedding.embedding", "gated_positional_embedding.embedding", COPY),
    ("gated_positional_embedding.gate", "gated_positional_embedding.gate", COPY),
    ("gated_positional_embedding.tile_embedding.weight", "gated_positional_embedding.tile_embedding", FLAT),
    ("post_tile_positional_embedding.embedding.weight", "post_tile_positional_embedding.embedding", FLAT),
    ("post_tile_positional_embedding.gate", "post_tile_positional_embedding.gate", COPY),
    ("layernorm_pre.weight", "layernorm_pre.scale", COPY),
    ("layernorm_pre.bias", "layernorm_pre.bias", COPY),
    ("layernorm_post.weight", "layernorm_post.scale", COPY),
    ("layernorm_post.bias", "layernorm_post.bias", COPY),
)
PROJECTOR = (
    ("multi_modal_projector.weight", "multi_modal_projector.kernel", LINEAR),
    ("multi_modal_projector.bias", "multi_modal_projector.bias", COPY),
)

# (HF prefix, our prefix) of each part, per architecture, in the hub's layout (Qwen2: Llama's).
LLAMA_PREFIXES = {"text": ("model.", "model."), "lm_head": "lm_head.weight"}
MLLAMA_PREFIXES = {
    "text": ("language_model.model.", "language_model."),
    "lm_head": "language_model.lm_head.weight",
    "vision": ("vision_model.", "vision_model."),
}
# transformers 4.52-4.57 layout -> hub layout (Mllama only).
MLLAMA_NEW_LAYOUT = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str
    ours: str
    transform: Copy | Linear | FlattenTail | Conv | Flatten


def _expand(rules, hf_prefix: str, our_prefix: str, indices=None) -> Iterator[Entry]:
    """The rules under the two prefixes; with `indices`, once per layer i under `layers.{i}.`."""
    for i in [None] if indices is None else indices:
        layer = "" if i is None else f"layers.{i}."
        for hf, ours, transform in rules:
            yield Entry(hf_prefix + layer + hf, our_prefix + layer + ours, transform)


def key_table(config: config_lib.ModelConfig) -> list[Entry]:
    """Every (HF key, our path, transform) of a model with this config."""
    t = config.text
    mllama = isinstance(config, config_lib.MllamaConfig)
    prefixes = MLLAMA_PREFIXES if mllama else LLAMA_PREFIXES
    hf_text, our_text = prefixes["text"]
    out = list(_expand(TEXT_MODEL, hf_text, our_text))
    out += _expand(TEXT_SELF_LAYER + (QKV_BIAS if t.qkv_bias else ()), hf_text, our_text, t.self_attention_layers)
    out += _expand(TEXT_CROSS_LAYER, hf_text, our_text, t.cross_attention_layers)
    if not t.tie_word_embeddings:
        out.append(Entry(prefixes["lm_head"], "lm_head", LINEAR))
    if mllama:
        v = config.vision
        hf_v, our_v = prefixes["vision"]
        out += _expand(VISION_MODEL, hf_v, our_v)
        out += _expand(VISION_LAYER, hf_v + "transformer.", our_v + "transformer.", range(v.num_layers))
        out += _expand(
            VISION_GLOBAL_LAYER, hf_v + "global_transformer.", our_v + "global_transformer.", range(v.num_global_layers)
        )
        out += _expand(PROJECTOR, "", "")
    return out


def canonical_key(key: str, config: config_lib.ModelConfig) -> str:
    """An HF key in either Mllama layout -> the hub layout."""
    if isinstance(config, config_lib.MllamaConfig):
        for new, old in MLLAMA_NEW_LAYOUT:
            if key.startswith(new):
                return old + key[len(new) :]
    return key


# --------------------------------------------------------------------------------------------------
# Loading


def read_config(path: str) -> tuple[config_lib.ModelConfig, dict]:
    """(our config, the raw dict) from a folder's config.json or a config.json path."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no config.json at {file}") from None
    except IsADirectoryError:
        raise UserError(f"{file}: is a folder, not a config.json file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not valid UTF-8 ({e})") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{file}: invalid JSON ({e})") from None
    try:
        return config_lib.from_hf_dict(raw), raw
    except UserError as e:
        raise UserError(f"{file}: {e}") from None


def _list(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_tied_head(path: str, files, location, head_key: str, embed_key: str, vocab: int) -> None:
    """A stored lm_head of a tied checkpoint must equal embed_tokens[:vocab] (compared in row blocks)."""
    (head_file, head), (embed_file, embed) = location[head_key], location[embed_key]
    where = f"{os.path.join(path, head_file)}: tensor {head!r}"
    if files[head_file].shape(head) != (vocab, files[embed_file].shape(embed)[1]):
        raise UserError(
            f"{where} has shape {list(files[head_file].shape(head))} but tie_word_embeddings is true and "
            f"embed_tokens gives [{vocab}, {files[embed_file].shape(embed)[1]}]"
        )
    worst, differs = 0.0, False
    a, b = files[head_file].get(head), files[embed_file].get(embed)
    for start in range(0, vocab, 4096):
        x, y = a[start : start + 4096].astype(np.float32), b[start : start + 4096].astype(np.float32)
        if not np.array_equal(x, y):  # NaN != NaN: a head with NaNs is never taken as equal
            differs = True
            worst = max(worst, float(np.nanmax(np.abs(x - y), initial=0.0)))
    if differs:
        raise UserError(
            f"{where} differs from {embed!r} (max |diff| {worst:.3g}) but config.json has tie_word_embeddings "
            "true, which uses embed_tokens as the output layer: set it false to use the stored lm_head"
        )


def from_pretrained(
    path: str,
    *,
    dtype=jnp.float32,
    compute_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    remat: bool = False,
    scan_layers: bool = False,
    config: config_lib.ModelConfig | None = None,
) -> nnx.Module:
    """Load an HF checkpoint folder (config.json + safetensors, sharded or not) of
    `MllamaForConditionalGeneration`, `LlamaForCausalLM` or `Qwen2ForCausalLM`.

    `dtype` is the parameter dtype, `compute_dtype` the activation dtype (default: `dtype`). With a
    `mesh`, every parameter goes straight into its sharding under the rules table. `scan_layers`:
    the layer stacks stored stacked (each stack's tensors are stacked on the host). `config`
    overrides the one read from config.json (e.g. to pick transformers' semantics flags); it must
    describe the same shapes.
    """
    integrity.verify_folder(path)  # a shipped folder (the study base) is its recorded bytes
    hf_config, _ = read_config(path)
    config = hf_config if config is None else config
    files, weight_map = safetensors_io.open_folder(path)
    location = {}
    for key, name in weight_map.items():
        canon = canonical_key(key, config)
        if canon in location:
            raise UserError(f"{path}: tensor {canon!r} appears twice ({key!r} in {name})")
        location[canon] = (name, key)

    table = {e.ours: e for e in key_table(config)}
    expected = {e.hf for e in table.values()}
    unexpected = set(location) - expected
    if config.text.tie_word_embeddings:
        # Some tied checkpoints also store the (identical) lm_head; it is not a parameter of ours,
        # so it is dropped, but only after checking it is identical: else logits would change.
        for key in {MLLAMA_PREFIXES["lm_head"], LLAMA_PREFIXES["lm_head"]} & set(location):
            embed = next(e.hf for e in key_table(config) if e.ours.endswith("embed_tokens"))
            _check_tied_head(path, files, location, key, embed, config.text.vocab_size)
        unexpected -= {MLLAMA_PREFIXES["lm_head"], LLAMA_PREFIXES["lm_head"]}
    if unexpected:
        files_of = sorted({location[k][0] for k in unexpected})
        raise UserError(f"{path}: unexpected tensor(s) in {files_of} for {config.architecture}: {_list(unexpected)}")
    missing = expected - set(location)
    if missing:
        raise UserError(f"{path}: missing tensor(s) for {config.architecture}: {_list(missing)}")

    abstract = build.abstract_model(
        config, param_dtype=dtype, dtype=compute_dtype, remat=remat, scan_layers=scan_layers
    )
    graphdef, abstract_state = nnx.split(abstract)
    periods = stacking.periods(build.flat_params(abstract_state))
    slices: dict[str, dict] = {}  # our parameter path -> {slice g (None outside the layer stacks): entry}
    for e in table.values():
        ours, g = stacking.locate(e.ours, periods)
        slices.setdefault(ours, {})[g] = e
    filled = set()

    def read(entry: Entry, shape: tuple[int, ...], dtype) -> np.ndarray:
        name, key = location[entry.hf]
        f = files[name]
        want = entry.transform.hf_shape(shape)
        if f.shape(key) != want:
            raise UserError(
                f"{os.path.join(path, name)}: tensor {key!r} has shape {list(f.shape(key))}, expected "
                f"{list(want)} for this config.json"
            )
        return entry.transform.to_ours(f.get(key), shape).astype(dtype)

    def load(our_path: str, var: nnx.Variable) -> jax.Array:
        if our_path not in slices:
            raise AssertionError(f"parameter {our_path} has no entry in the conversion table")
        entries, shape = slices[our_path], tuple(var.shape)
        if None in entries:
            value = read(entries[None], shape, var.dtype)
        else:  # a layer stack [G, ...]: its layers' tensors, stacked on the host
            if sorted(entries) != list(range(shape[0])):
                raise AssertionError(f"layer stack {our_path} of {shape[0]} layers has table entries {sorted(entries)}")
            value = np.stack([read(entries[g], shape[1:], var.dtype) for g in range(shape[0])])
        filled.add(our_path)
        return build.put(np.ascontiguousarray(value), var, mesh)

    state = build.map_params(abstract_state, load)
    unfilled = set(slices) - filled
    if unfilled:
        raise AssertionError(f"conversion table entries without a parameter: {_list(unfilled)}")
    for f in files.values():
        f.close()
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------------
# Saving


def save_pretrained(
    model: nnx.Module,
    path: str,
    *,
    dtype=None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write config.json + safetensors (hub key layout) that `transformers` loads with no missing or
    unexpected keys. `dtype` (default: the parameters') is the stored dtype. Tensors are fetched and
    written one at a time. In a multi-process run every process must call this; process 0 writes."""
    config = model.config
    params = build.flat_params(nnx.state(model, nnx.Param))
    table = key_table(config)
    periods = stacking.periods(params)
    where = {e.hf: stacking.locate(e.ours, periods) for e in table}  # HF key -> (our path, slice or None)
    paths = {p for p, _ in where.values()}
    missing = paths - set(params)
    if missing:
        raise AssertionError(f"model lacks parameters of the conversion table: {_list(missing)}")
    extra = set(params) - paths
    if extra:
        raise AssertionError(f"parameters without a conversion table entry: {_list(extra)}")
    store = np.dtype(dtype) if dtype is not None else None
    by_hf = {e.hf: e for e in table}
    entries = []
    for e in table:
        ours, g = where[e.hf]
        var = params[ours]
        shape = tuple(var.shape[1:] if g is not None else var.shape)
        entries.append((e.hf, e.transform.hf_shape(shape), store or np.dtype(var.dtype)))

    def get(key: str) -> np.ndarray:
        ours, g = where[key]
        value = params[ours][...]
        value = by_hf[key].transform.to_hf(placement.to_host(value if g is None else stacking.layer(value, g)))
        return value.astype(store or value.dtype)

    dtype_name = {np.dtype(np.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}
    first = entries[0][2]
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        safetensors_io.write_folder(path, entries, get, max_shard_bytes=max_shard_bytes)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config_lib.to_hf_dict(config, dtype=dtype_name.get(first, "float32")), f, indent=2)
    else:  # take part in the gathers of non-addressable arrays
        for key, _, _ in entries:
            get(key)


# --------------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def save_adapter(model: nnx.Module, path: str, *, base_model: str | None = None) -> dict[str, Any]:
    """A LoRA model's adapters (`models.lora`) as PEFT writes them: adapter_config.json and
    adapter_model.safetensors (`base_model.model.<module>.lora_A.weight` [r, in], `lora_B.weight`
    [out, r], fp32), under the module names of the installed transformers' model (Mllama: its
    4.52+ layout), every adapted module named in `target_modules`. `peft.PeftModel.from_pretrained`
    loads it onto the base model (`base_model`: recorded as base_model_name_or_path). Process 0 writes."""
    from sftrl_jax.models import lora

    config = model.config
    params = build.flat_params(nnx.state(model, nnx.Param))
    periods = stacking.periods(params)
    modules = lora.adapted(model)
    tensors, targets, ranks, scales = {}, [], set(), set()
    for e in key_table(config):
        ours, g = stacking.locate(e.ours, periods)
        if ours + lora.A not in params:
            continue
        a, b = (params[ours + s][...] for s in (lora.A, lora.B))
        if g is not None:
            a, b = stacking.layer(a, g), stacking.layer(b, g)
        module = _adapter_module_name(e.hf.removesuffix(".weight"), config)
        # contiguous: safetensors writes an array's buffer as it lies in memory (a transposed view's too)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(
            e.transform.to_hf(placement.to_host(a)), np.float32
        )
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(
            LINEAR.to_hf(placement.to_host(b)), np.float32
        )
        targets.append(module)
        ranks.add(int(a.shape[-1]))
        scales.add(float(modules[ours]))
    if not targets:
        raise UserError("the model has no LoRA adapters to save (lora.rank 0, or a merged model)")
    if len(ranks) != 1 or len(scales) != 1:
        raise UserError(
            f"PEFT's format holds one rank and alpha per adapter; the model has ranks {ranks}, scales {scales}"
        )
    rank, scale = ranks.pop(), scales.pop()
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    if jax.process_index() == 0:
        from safetensors.numpy import save_file

        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
            json.dump(adapter_config, f, indent=2)
    return adapter_config


def _adapter_module_name(hub_name: str, config) -> str:
    """A hub-layout module name -> the installed transformers' module tree (Mllama moved in 4.52)."""
    if isinstance(config, config_lib.MllamaConfig):
        for new, old in MLLAMA_NEW_LAYOUT:
            if hub_name.startswith(old):
                return new + hub_name[len(old) :]
    return hub_name

"""`sftrl inspect`: config summary and parameter count, computed abstractly (no weights allocated)."""

from __future__ import annotations

import math
import os

HELP = "print a model's config summary and parameter count without allocating weights"
EXAMPLES = """examples:
  sftrl inspect /path/to/Llama-3.2-11B-Vision-Instruct
  sftrl inspect /path/to/Qwen2.5-7B-Instruct
  sftrl inspect /path/to/config.json --mesh data=1,fsdp=8,tensor=1
  sftrl inspect ckpts/init --mesh data=2,fsdp=4,tensor=1 --dtype bfloat16

PATH is a Hugging Face folder, a bare config.json or a checkpoint of `sftrl convert`. With --mesh it
also prints the bytes per device of parameters, gradients and AdamW state under the sharding rules
(largest shard; activations not included), so you know whether a run fits before renting machines.
"""


def add_arguments(parser):
    parser.add_argument("path", metavar="PATH", help="HF folder, config.json, or sftrl checkpoint folder")
    parser.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=1,fsdp=8,tensor=1 (-1 = the rest)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="parameter dtype (default: the checkpoint's or float32)",
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n:,} bytes)"


def _summary(config) -> list[str]:
    from sftrl_jax.models import config as config_lib

    t = config.text
    rope = f"{t.rope_type} theta={t.rope_theta:g}"
    if t.rope_type == "llama3":
        rope += f" factor={t.rope_factor:g} original_max_position={t.rope_original_max_position}"
    lines = [
        f"architecture: {config.architecture}",
        f"text: {t.num_layers} layers, width {t.hidden_size}, mlp {t.intermediate_size}, heads {t.num_heads} "
        f"(kv {t.num_kv_heads}, dim {t.head_dim}), vocab {t.vocab_size}"
        + (f" (+{t.extra_embeddings} embedding rows)" if t.extra_embeddings else "")
        + (", q/k/v bias" if t.qkv_bias else "")
        + (", tied lm_head" if t.tie_word_embeddings else ""),
        f"rope: {rope}",
    ]
    if isinstance(config, config_lib.MllamaConfig):
        v = config.vision
        lines += [
            f"cross-attention layers: {list(t.cross_attention_layers)} "
            f"(imageless rows: {'zeroed (Meta)' if t.cross_attention_zero_imageless_rows else 'MLP only (transformers)'})",
            f"vision: {v.num_layers} local + {v.num_global_layers} global layers, width {v.hidden_size}, "
            f"heads {v.num_heads}, {v.image_size}px tiles x {v.max_num_tiles}, {v.num_patches} tokens/tile, "
            f"intermediate {list(v.intermediate_layers_indices)} ({v.intermediate_layer_features}s), "
            f"output {v.output_dim}",
        ]
    return lines


def run(args) -> int:
    from sftrl_jax import models
    from sftrl_jax.errors import UserError
    from sftrl_jax.models import checkpoint
    from sftrl_jax.parallel import mesh as mesh_lib

    path = args.path
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or folder")
    if os.path.isdir(path) and checkpoint.is_checkpoint(path):
        config, stored_dtype = checkpoint.read_checkpoint_config(path)
    else:
        config, _ = models.read_config(path)
        stored_dtype = "float32"
    dtype = args.dtype or stored_dtype
    for line in _summary(config):
        print(line)
    print(f"parameters: {models.param_count(config)}")
    if args.mesh:
        sizes = mesh_lib.parse_mesh_spec(args.mesh)
        if -1 in sizes.values():
            import jax

            n = jax.device_count()
        else:
            n = math.prod(sizes.values())
        sizes = mesh_lib.resolve_axis_sizes(sizes, n)
        params = models.per_device_bytes(config, sizes, param_dtype=dtype)["params"]
        print(f"mesh: {', '.join(f'{k}={v}' for k, v in sizes.items())} ({n} devices), parameters in {dtype}")
        print(f"per device: params {_gib(params)}")
        print(f"per device: grads {_gib(params)}")
        print(f"per device: adamw state (mu, nu in {dtype}) {_gib(2 * params)}")
        print(f"per device: total {_gib(4 * params)} + activations")
    return 0

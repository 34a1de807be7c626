"""`sftrl convert`: a Hugging Face checkpoint folder -> our orbax model checkpoint."""

from __future__ import annotations

import time

HELP = "convert a Hugging Face checkpoint folder to an orbax checkpoint"
EXAMPLES = """examples:
  sftrl convert --hf /path/to/Llama-3.2-11B-Vision-Instruct --out ckpts/init
  sftrl convert --hf /path/to/Llama-3.2-1B-Instruct --out ckpts/llama1b --dtype bfloat16 --mesh data=1,fsdp=-1,tensor=1
  sftrl convert --hf /path/to/Qwen2.5-1.5B-Instruct --out ckpts/qwen1.5b --dtype bfloat16

The folder holds config.json and model.safetensors (or shards + model.safetensors.index.json) of a
MllamaForConditionalGeneration, LlamaForCausalLM or Qwen2ForCausalLM (Qwen2.5). Weights stream
tensor by tensor into their shardings on the mesh (default: every device on fsdp), so the model is
never whole on one device.
"""


def add_arguments(parser):
    parser.add_argument("--hf", required=True, metavar="PATH", help="Hugging Face checkpoint folder")
    parser.add_argument("--out", required=True, metavar="CKPT", help="output checkpoint folder")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype to store (float32)"
    )
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh sizes, e.g. data=1,fsdp=8,tensor=1 (fsdp=-1)")


def run(args) -> int:
    from sftrl_jax import models
    from sftrl_jax.models import checkpoint
    from sftrl_jax.parallel import make_mesh

    start = time.time()
    mesh = make_mesh(args.mesh)
    model = models.from_pretrained(args.hf, dtype=args.dtype, mesh=mesh)
    checkpoint.save_checkpoint(model, args.out)
    n = models.param_count(model.config)
    print(f"{model.config.architecture}: {n:,} parameters ({args.dtype}) -> {args.out} in {time.time() - start:.1f}s")
    return 0

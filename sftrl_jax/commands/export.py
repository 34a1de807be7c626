"""`sftrl export`: our orbax model checkpoint -> a Hugging Face checkpoint folder."""

from __future__ import annotations

import time

HELP = "export an orbax checkpoint back to a Hugging Face folder"
EXAMPLES = """examples:
  sftrl export --ckpt ckpts/init --out hf/my-model
  sftrl export --ckpt runs/rl-gp-vl/final --out hf/rl-gp-vl --dtype bfloat16 --max-shard-gb 5

Writes config.json and model.safetensors (sharded with model.safetensors.index.json above
--max-shard-gb) that transformers loads with `from_pretrained`. Copy the tokenizer files and
preprocessor_config.json of the original model beside them to use it with a processor.
"""


def add_arguments(parser):
    parser.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint folder written by `sftrl convert`")
    parser.add_argument("--out", required=True, metavar="PATH", help="output Hugging Face folder")
    parser.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16"), help="stored dtype (default: the checkpoint's)"
    )
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh to restore onto, e.g. data=1,fsdp=8,tensor=1")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (5 GB)")


def run(args) -> int:
    from sftrl_jax import models
    from sftrl_jax.errors import UserError
    from sftrl_jax.models import checkpoint
    from sftrl_jax.parallel import make_mesh

    if args.max_shard_gb <= 0:
        raise UserError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    start = time.time()
    model = checkpoint.load_checkpoint(args.ckpt, mesh=make_mesh(args.mesh))
    models.save_pretrained(model, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"{model.config.architecture} -> {args.out} in {time.time() - start:.1f}s")
    return 0

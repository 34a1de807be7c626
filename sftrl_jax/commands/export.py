"""`sftrl export`: our orbax model checkpoint -> a Hugging Face checkpoint folder, or a LoRA run's
adapters in PEFT's format."""

from __future__ import annotations

import time

HELP = "export an orbax checkpoint back to a Hugging Face folder (or a LoRA run's adapters for PEFT)"
EXAMPLES = """examples:
  sftrl export --ckpt ckpts/init --out hf/my-model
  sftrl export --ckpt runs/rl-gp-vl/final --out hf/rl-gp-vl --dtype bfloat16 --max-shard-gb 5
  sftrl export --merge --ckpt runs/sft-lora/final --out hf/sft-lora     # the full model, adapters folded in
  sftrl export --adapter --ckpt runs/sft-lora/final --out peft/sft-lora # adapter_config.json + adapter_model.safetensors

Writes config.json and model.safetensors (sharded with model.safetensors.index.json above
--max-shard-gb) that transformers loads with `from_pretrained`. Copy the tokenizer files and
preprocessor_config.json of the original model beside them to use it with a processor. A LoRA run's
final/ (and snapshots) hold the merged model, so --merge is the default; --adapter writes the adapters
that `peft.PeftModel.from_pretrained(base, OUT)` loads onto the base model (`--base` records its name).
"""


def add_arguments(parser):
    parser.add_argument("--ckpt", required=True, metavar="CKPT", help="checkpoint folder written by `sftrl convert`")
    parser.add_argument("--out", required=True, metavar="PATH", help="output Hugging Face folder")
    parser.add_argument(
        "--dtype", default=None, choices=("float32", "bfloat16"), help="stored dtype (default: the checkpoint's)"
    )
    parser.add_argument("--mesh", default="fsdp=-1", help="mesh to restore onto, e.g. data=1,fsdp=8,tensor=1")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (5 GB)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--merge", action="store_true", help="the full model with any LoRA adapters folded in (default)")
    kind.add_argument("--adapter", action="store_true", help="a LoRA run's adapters in PEFT's format")
    parser.add_argument("--base", default=None, help="--adapter: the base model's name or path to record")


def run(args) -> int:
    from sftrl_jax import models
    from sftrl_jax.errors import UserError
    from sftrl_jax.models import checkpoint
    from sftrl_jax.parallel import make_mesh

    if args.max_shard_gb <= 0:
        raise UserError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    start = time.time()
    if args.adapter:
        return _adapter(args, start)
    model = checkpoint.load_checkpoint(args.ckpt, mesh=make_mesh(args.mesh))
    models.save_pretrained(model, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"{model.config.architecture} -> {args.out} in {time.time() - start:.1f}s")
    return 0


def _adapter(args, start: float) -> int:
    import json
    import os
    import shutil

    from sftrl_jax.errors import UserError
    from sftrl_jax.integrity import read_json
    from sftrl_jax.models.convert import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from sftrl_jax.train.run import ADAPTER_DIR

    src = os.path.join(args.ckpt, ADAPTER_DIR)
    if not os.path.exists(os.path.join(src, ADAPTER_CONFIG)):
        raise UserError(f"{args.ckpt} holds no LoRA adapters ({ADAPTER_DIR}/{ADAPTER_CONFIG}): not a LoRA run's model")
    config = read_json(os.path.join(src, ADAPTER_CONFIG))
    if args.base is not None:
        config["base_model_name_or_path"] = args.base
    os.makedirs(args.out, exist_ok=True)
    shutil.copyfile(os.path.join(src, ADAPTER_WEIGHTS), os.path.join(args.out, ADAPTER_WEIGHTS))
    with open(os.path.join(args.out, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    n = len(config["target_modules"])
    print(f"LoRA adapters (rank {config['r']}, {n} modules) -> {args.out} in {time.time() - start:.1f}s")
    return 0

"""`tools/bench.py sft`: our jitted SFT step vs a plain PyTorch/transformers step, same model and batch.

Both sides: the same Llama weights (transformers builds the model, ours loads its safetensors), the
same random batch of token ids with the loss on every token, fp32, AdamW with global-norm clipping
1.0, one optimiser step per iteration. Each side runs in its own process (so neither shares its
allocator or thread pools with the other), the sides alternate `--rounds` times (so a change in
machine load hits both alike), and each side's time is the median of all its timed steps. The run
first waits for the 1-minute load average to drop below `--max-load`.
MFU = 6 N tokens/s / the measured fp32 matmul peak of this machine (one device, all threads).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The ~34M-parameter Llama of the sampler benchmark (issues 4 and 5).
BENCH_CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)


def torch_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**BENCH_CONFIG, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).float()


def torch_step(model, ids: np.ndarray):
    """One PyTorch training step (forward, backward, clip, AdamW) as a closure over the batch."""
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    x = torch.from_numpy(ids).long()

    def step():
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def lm_batch(ids: np.ndarray) -> dict:
    """Our SFT batch for token ids [B, T] with the objective of transformers' labels=input_ids:
    predict token t+1 at every position t < T-1."""
    import jax.numpy as jnp

    B, T = ids.shape
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], axis=1)
    mask = np.ones((B, T), np.float32)
    mask[:, -1] = 0
    return {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.ones((B, T), jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "loss_mask": jnp.asarray(mask),
    }


def our_step(hf_dir: str, ids: np.ndarray):
    """Our jitted SFT step on the same weights and batch -> (closure, compile seconds, parameter count)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sftrl_jax import ops
    from sftrl_jax.models import from_pretrained
    from sftrl_jax.sft.train import make_train_step
    from sftrl_jax.train import optim
    from sftrl_jax.train.state import TrainState, rng_data

    model = from_pretrained(hf_dir, dtype=jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    cfg = optim.OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant", grad_clip=1.0, skip_nonfinite=False)
    tx = optim.make_optimizer(cfg, params, total_steps=1000)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng_data(0))
    train_step = jax.jit(
        # the loop's policy: the native CPU kernels on one CPU device when they are built
        make_train_step(graphdef, rest, tx, grad_accum=1, lr_fn=optim.schedule(cfg, 10), policy=ops.policy_for(None)),
        donate_argnums=0,
    )
    batch = lm_batch(ids)
    box = [state]

    def step():
        box[0], m = train_step(box[0], batch)
        jax.block_until_ready(m["loss"])

    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0, n_params


def _timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def worker_main(argv: list[str]) -> int:
    """One side in its own process: `--side ours|torch --model DIR ...` -> a `RESULT {json}` line."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=("ours", "torch"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    args = p.parse_args(argv)
    ids = np.random.default_rng(0).integers(
        0, BENCH_CONFIG["vocab_size"], size=(args.batch, args.length), dtype=np.int64
    )
    out: dict = {}
    if args.side == "ours":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        step, out["compile_s"], out["n_params"] = our_step(args.model, ids)
        from sftrl_jax import ops

        out["matmul"] = (
            "OpenBLAS sgemm (kernels.gemm, q|k|v and gate|up fused; causal attention: "
            "kernels.causal_attention; RoPE: kernels.rope)"
            if ops.policy_for(None).cpu_kernels
            else "XLA dot"
        )
    else:
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
        step = torch_step(model, ids)
    for _ in range(args.warmup):
        step()
    out["times_s"] = [_timed(step) for _ in range(args.steps)]
    print("RESULT " + json.dumps(out))
    return 0


def _run_worker(side: str, folder: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", folder]
    cmd += ["--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def bench_sft(args) -> list[str]:
    from bench_sampler import wait_for_load

    from sftrl_jax.train.metrics import peak_flops

    load0 = wait_for_load(args.max_load, args.wait_seconds)
    runs: dict[str, list[dict]] = {"torch": [], "ours": []}
    with tempfile.TemporaryDirectory() as folder:
        torch_model().save_pretrained(folder, safe_serialization=True)
        for _ in range(args.rounds):  # alternate the sides, each in a fresh process
            for side in runs:
                print(f"running {side} ...", file=sys.stderr, flush=True)
                runs[side].append(_run_worker(side, folder, args))
    load1 = os.getloadavg()[0]
    ours = [t for r in runs["ours"] for t in r["times_s"]]
    theirs = [t for r in runs["torch"] for t in r["times_s"]]
    n_params = runs["ours"][0]["n_params"]
    compile_s = min(r["compile_s"] for r in runs["ours"])
    tokens = args.batch * args.length
    ours_tps = tokens / statistics.median(ours)
    torch_tps = tokens / statistics.median(theirs)
    peak = peak_flops(n=2048)
    lines = [
        f"model: Llama {BENCH_CONFIG['hidden_size']}d x {BENCH_CONFIG['num_hidden_layers']} layers, vocab "
        f"{BENCH_CONFIG['vocab_size']}, {n_params / 1e6:.1f}M parameters, fp32; batch {args.batch} x {args.length} tokens; "
        f"AdamW + clip 1.0; each side in its own process, {args.rounds} alternating processes per side, "
        f"median of {args.steps} steps per process after {args.warmup} warm-up",
        f"load average (1 min): {load0:.2f} at the start, {load1:.2f} at the end (this run's own threads count up to 2)",
        f"machine fp32 matmul peak (2048^3, one device, best of XLA dot and OpenBLAS): {peak / 1e9:.1f} GFLOP/s",
        f"ours (jax {_version('jax')}): {ours_tps:,.0f} tokens/s, {statistics.median(ours) * 1e3:.0f} ms/step "
        f"(best {min(ours) * 1e3:.0f}), MFU {6 * n_params * ours_tps / peak:.1%}, compile {compile_s:.1f} s, "
        f"matrix products on {runs['ours'][0]['matmul']}",
        f"pytorch (torch {_version('torch')}, transformers {_version('transformers')}): {torch_tps:,.0f} tokens/s, "
        f"{statistics.median(theirs) * 1e3:.0f} ms/step (best {min(theirs) * 1e3:.0f}), MFU {6 * n_params * torch_tps / peak:.1%}",
        f"sft speedup vs pytorch: {ours_tps / torch_tps:.2f}x",
    ]
    for line in lines:
        print(line)
    return lines


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))

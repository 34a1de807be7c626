"""`tools/bench.py sft`: our jitted SFT step vs a plain PyTorch/transformers step, same model and batch.

Both sides: the same Llama weights (transformers builds the model, ours loads its safetensors), the
same random batch of token ids with the loss on every token, fp32, AdamW with global-norm clipping
1.0, one optimiser step per iteration. Timed after warm-up as the median of `--steps` steps.
MFU = 6 N tokens/s / the measured fp32 matmul peak of this machine (one device, all threads).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

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


def time_torch(model, ids: np.ndarray, steps: int, warmup: int) -> list[float]:
    import torch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    x = torch.from_numpy(ids).long()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_ours(hf_dir: str, ids: np.ndarray, steps: int, warmup: int) -> tuple[list[float], float, int]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sftrl_jax.models import from_pretrained
    from sftrl_jax.sft.train import make_train_step
    from sftrl_jax.train import optim
    from sftrl_jax.train.state import TrainState, rng_data

    model = from_pretrained(hf_dir, dtype=jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    cfg = optim.OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant", grad_clip=1.0, skip_nonfinite=False)
    tx = optim.make_optimizer(cfg, params, total_steps=steps + warmup)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng_data(0))
    step = jax.jit(make_train_step(graphdef, rest, tx, grad_accum=1, lr_fn=optim.schedule(cfg, 10)), donate_argnums=0)
    # Same objective as transformers' labels=input_ids: predict token t+1 at every position t < T-1.
    B, T = ids.shape
    targets = np.concatenate([ids[:, 1:], np.zeros((B, 1), ids.dtype)], axis=1)
    mask = np.ones((B, T), np.float32)
    mask[:, -1] = 0
    batch = {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "attention_mask": jnp.ones((B, T), jnp.int32),
        "targets": jnp.asarray(targets, jnp.int32),
        "loss_mask": jnp.asarray(mask),
    }
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, compile_s, n_params


def bench_sft(args) -> int:
    import torch

    from sftrl_jax.train.metrics import peak_flops

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, BENCH_CONFIG["vocab_size"], size=(args.batch, args.length), dtype=np.int64)
    model = torch_model()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        load0 = os.getloadavg()[0]
        ours, compile_s, n_params = time_ours(d, ids, args.steps, args.warmup)
    theirs = time_torch(model, ids, args.steps, args.warmup)
    load1 = os.getloadavg()[0]
    tokens = args.batch * args.length
    ours_tps = tokens / statistics.median(ours)
    torch_tps = tokens / statistics.median(theirs)
    peak = peak_flops(n=2048)
    lines = [
        f"model: Llama {BENCH_CONFIG['hidden_size']}d x {BENCH_CONFIG['num_hidden_layers']} layers, vocab "
        f"{BENCH_CONFIG['vocab_size']}, {n_params / 1e6:.1f}M parameters, fp32; batch {args.batch} x {args.length} tokens; "
        f"AdamW + clip 1.0; median of {args.steps} steps after {args.warmup} warm-up",
        f"load average: {load0:.2f} before, {load1:.2f} after",
        f"machine fp32 matmul peak (2048^3, one device): {peak / 1e9:.1f} GFLOP/s",
        f"ours (jax {_version('jax')}): {ours_tps:,.0f} tokens/s, {statistics.median(ours) * 1e3:.0f} ms/step, "
        f"MFU {6 * n_params * ours_tps / peak:.1%}, compile {compile_s:.1f} s",
        f"pytorch (torch {_version('torch')}, transformers {_version('transformers')}): {torch_tps:,.0f} tokens/s, "
        f"{statistics.median(theirs) * 1e3:.0f} ms/step, MFU {6 * n_params * torch_tps / peak:.1%}",
        f"sft speedup vs pytorch: {ours_tps / torch_tps:.2f}x",
    ]
    for line in lines:
        print(line)
    return lines


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)

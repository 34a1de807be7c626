"""`tools/bench.py lora`: the sampler with LoRA adapters applied in the forward (what `sftrl rl` does)
vs merged into the weights once per parameter version, same model, prompts and batch, one process.

The model is `bench_sampler`'s ~34M-parameter Llama (random weights), rank-16 adapters on the attention
and MLP products with random B (as after training). Per side: one warm-up call (compiles), then the
median of `repeats` timed `sampling.generate` calls (greedy, exactly `new_tokens` tokens, batch x
prompt); the merged side also times `lora.merge` (once per update in a run, untimed compile excluded).
Both sides' greedy tokens must be equal (fp32: the two forwards are one function). Then, with a bf16
base, how much of the adapters' effect on the logits a merge into bf16 weights loses.
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def _model(rank: int, *, dtype=None, b_scale: float = 0.02):
    import bench_sampler
    import jax
    from flax import nnx

    from sftrl_jax.models import config as config_lib
    from sftrl_jax.models import lora
    from sftrl_jax.models.text import LlamaForCausalLM

    c = bench_sampler.CONFIG
    cfg = config_lib.LlamaConfig.tiny(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        max_position_embeddings=c["max_position_embeddings"],
    )
    kw = {} if dtype is None else {"param_dtype": dtype, "dtype": dtype}
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), **kw)
    lora.add(model, lora.LoRASection(rank=rank, alpha=2 * rank), seed=0)
    i = 0
    for _, module in nnx.iter_graph(model):
        for name, var in vars(module).items() if isinstance(module, nnx.Module) else ():
            if name.endswith("_lora_b"):
                i += 1
                var[...] = b_scale * jax.random.normal(jax.random.key(i), var.shape)
    return model


def bench_lora(args) -> tuple[list[str], float]:
    import bench_sampler
    import jax
    from flax import nnx

    from sftrl_jax import sampling
    from sftrl_jax.models import lora

    model = _model(args.rank)
    prompt = bench_sampler.prompts(args.batch, args.prompt)

    def timed(m):
        out = sampling.generate(m, prompt, max_new_tokens=args.new_tokens, temperature=0.0, stop_tokens=())
        toks = np.asarray(out.tokens)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(
                sampling.generate(m, prompt, max_new_tokens=args.new_tokens, temperature=0.0, stop_tokens=()).tokens
            )
            times.append(time.perf_counter() - t0)
        return toks, statistics.median(times)

    factored_tokens, factored_s = timed(model)
    lora.merge(nnx.clone(model))  # warm-up: compiles what merge jits
    merges = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        merged = lora.merge(nnx.clone(model))
        jax.block_until_ready(jax.tree.leaves(nnx.state(merged)))
        merges.append(time.perf_counter() - t0)
    merge_s = statistics.median(merges)
    merged_tokens, merged_s = timed(merged)
    n = args.batch * args.new_tokens
    same = bool(np.array_equal(factored_tokens, merged_tokens))
    lines = [
        f"model: bench_sampler's 34M Llama (fp32), LoRA rank {args.rank} on attention + MLP, batch {args.batch}, "
        f"prompt {args.prompt}, {args.new_tokens} new tokens, greedy; median of {args.repeats} calls, jax {jax.__version__}",
        f"adapters in the forward: {factored_s:.3f} s per generate ({n / factored_s:.0f} tokens/s)",
        f"merged weights: {merged_s:.3f} s per generate ({n / merged_s:.0f} tokens/s) + merge {merge_s:.3f} s per update",
        f"greedy tokens equal: {same}",
    ]
    lines += _bf16_fidelity(args.rank)
    ratio = merged_s / factored_s
    lines.append(f"lora sampler: forward-applied / merged generate time: {factored_s / merged_s:.2f}x")
    if not same:
        raise SystemExit("the factored and merged forwards decoded different tokens: " + "; ".join(lines))
    return lines, ratio


def _bf16_fidelity(rank: int) -> list[str]:
    """With a bf16 base, the share of the adapters' effect on the logits that merging keeps: W + dW
    rounded to bf16 drops the part of a small dW below W's last bit (early in training, all of it)."""
    import jax.numpy as jnp
    from flax import nnx

    from sftrl_jax.models import lora

    ids = jnp.asarray(np.random.default_rng(0).integers(3, 8000, (4, 64)))
    lines = []
    for b_scale in (1e-3, 1e-2, 1e-1):
        model = _model(rank, dtype=jnp.bfloat16, b_scale=b_scale)
        factored = np.asarray(model(ids).logits, np.float32)
        for _, module in nnx.iter_graph(model):
            for name, var in vars(module).items() if isinstance(module, nnx.Module) else ():
                if name.endswith("_lora_b"):
                    var[...] = jnp.zeros_like(var[...])
        base = np.asarray(model(ids).logits, np.float32)  # B = 0: the base's own logits
        model = _model(rank, dtype=jnp.bfloat16, b_scale=b_scale)
        merged = np.asarray(lora.merge(nnx.clone(model))(ids).logits, np.float32)
        effect = np.linalg.norm(factored - base)
        err = np.linalg.norm(merged - factored) / effect
        lines.append(
            f"bf16 base, B ~ {b_scale:g}: merged vs adapters-in-forward logits differ by {err:.0%} of the adapters' "
            f"effect (|factored - base| = {effect:.3g})"
        )
    return lines

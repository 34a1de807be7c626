"""`tools/bench.py sampler`: our sampler vs transformers' `generate`, same weights, prompts and batch.

The model is the issue's ~34M-parameter Llama (vocab 8192, width 512, MLP 1536, 8 layers, 8 heads,
4 kv heads), random weights at a scale where greedy decoding has no near-ties, written once as an HF
folder that both sides load. Both sides decode greedily with a KV cache, batch 16, prompt 64,
exactly 128 new tokens (stop tokens off on both sides); tokens/s = 16 x 128 / the wall time of one
whole generate call (prefill, decode, results on the host). Each side runs in its own process
(torch's OpenMP threads and XLA's thread pool never share one), alternately, twice, so a change in
machine load hits both; every side's timing is the median of its timed calls. fp32 both sides
gives the headline ratio; bf16 both sides is reported too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
    rope_theta=500000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def write_model(folder: str, seed: int = 0) -> None:
    """A random transformers Llama, weights ~1/sqrt(fan-in) (peaked logits), saved as safetensors."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                std = 0.5 if "embed_tokens" in name else p.shape[1] ** -0.5
                p.normal_(0.0, std)
    model.save_pretrained(folder)


def prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    return np.random.default_rng(seed).integers(3, CONFIG["vocab_size"], (batch, length)).tolist()


# ------------------------------------------------------------------------------------------ workers


def _torch_worker(args) -> dict:
    import torch
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    model = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    load = time.perf_counter() - t0
    ids = torch.tensor(prompts(args.batch, args.prompt))
    gen = transformers.GenerationConfig(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
    )

    def call():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        return out[:, args.prompt :].numpy()

    return _time(call, args) | {"load_s": load, "threads": torch.get_num_threads()}


def _jax_worker(args) -> dict:
    import jax
    import jax.numpy as jnp

    from sftrl_jax import models, sampling
    from sftrl_jax.parallel import make_mesh

    mesh = make_mesh(args.mesh) if args.mesh else None
    t0 = time.perf_counter()
    model = models.from_pretrained(args.model, dtype=jnp.dtype(args.dtype), mesh=mesh)
    load = time.perf_counter() - t0
    batch = prompts(args.batch, args.prompt)

    def call():
        r = sampling.generate(model, batch, max_new_tokens=args.new_tokens, temperature=0.0, stop_tokens=())
        assert r.steps == args.new_tokens
        return r.tokens

    return _time(call, args) | {"load_s": load, "devices": len(jax.devices())}


def _time(call, args) -> dict:
    t0 = time.perf_counter()
    tokens = call()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "times_s": times, "tokens": np.asarray(tokens).tolist()}


def worker_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("torch", "jax"), required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--prompt", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    p.add_argument("--mesh", default=None)
    args = p.parse_args(argv)
    out = (_torch_worker if args.impl == "torch" else _jax_worker)(args)
    print("RESULT " + json.dumps(out))
    return 0


# --------------------------------------------------------------------------------------------- main


# Our configurations: name -> (XLA CPU devices, mesh). One device uses XLA's thread pool over every
# core. (One device per core with the model tensor-parallel over them, "tensor=-1", measured no
# faster here: see docs/BENCHMARKS.md.)
OURS = {"jax": (1, None)}
TENSOR_PARALLEL = ("jax-tp", (os.cpu_count() or 1, "tensor=-1"))
HEADLINE = "jax"


def _run_worker(impl: str, dtype: str, folder: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl.split("-")[0], "--dtype", dtype]
    cmd += ["--model", folder, "--batch", str(args.batch), "--prompt", str(args.prompt)]
    cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("XLA_FLAGS", None)
    if impl in OURS:
        devices, mesh = OURS[impl]
        if devices > 1:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
            cmd += ["--mesh", mesh]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {dtype} worker failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def wait_for_load(max_load: float, wait_seconds: float) -> float:
    """Waits (up to `wait_seconds`) for the 1-minute load average to drop below `max_load`."""
    deadline = time.time() + wait_seconds
    load = os.getloadavg()[0]
    while load >= max_load and time.time() < deadline:
        print(f"load average {load:.2f} >= {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(30)
        load = os.getloadavg()[0]
    return load


def bench_sampler(args) -> tuple[list[str], float]:
    if args.tensor_parallel:
        OURS[TENSOR_PARALLEL[0]] = TENSOR_PARALLEL[1]
    new = args.new_tokens
    n_tokens = args.batch * new
    load_start = wait_for_load(args.max_load, args.wait_seconds)
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as folder:
        write_model(folder)
        for dtype in args.dtypes:
            for _ in range(args.rounds):  # alternate the sides
                for impl in ("torch", *OURS):
                    print(f"running {impl} {dtype} ...", file=sys.stderr, flush=True)
                    runs.setdefault((impl, dtype), []).append(_run_worker(impl, dtype, folder, args))
    load_end = os.getloadavg()[0]

    lines = [
        f"model: Llama, vocab {CONFIG['vocab_size']}, width {CONFIG['hidden_size']}, MLP {CONFIG['intermediate_size']}, "
        f"{CONFIG['num_hidden_layers']} layers, {CONFIG['num_attention_heads']} heads ({CONFIG['num_key_value_heads']} kv), "
        "33,563,136 parameters, random weights ~1/sqrt(fan-in)",
        f"batch {args.batch}, prompt {args.prompt}, exactly {new} new tokens (no stop token), greedy, KV cache on both sides; "
        f"tokens/s = {n_tokens} / wall time of a whole generate call, median of {args.repeats} calls x {args.rounds} "
        "alternating processes per side",
        f"load average (1 min): {load_start:.2f} at the start, {load_end:.2f} at the end",
    ]
    ratio_fp32 = float("nan")
    names = {"jax": "ours (1 device)", "jax-tp": f"ours ({TENSOR_PARALLEL[1][0]} devices, tensor-parallel)"}
    for dtype in args.dtypes:
        t = runs[("torch", dtype)]
        t_times = [x for r in t for x in r["times_s"]]
        t_med = statistics.median(t_times)
        parts = [f"transformers {n_tokens / t_med:,.0f} tokens/s (best call {n_tokens / min(t_times):,.0f})"]
        for impl in OURS:
            j = runs[(impl, dtype)]
            j_times = [x for r in j for x in r["times_s"]]
            j_med = statistics.median(j_times)
            j_first = min(r["first_s"] for r in j)
            same = int(np.sum(np.all(np.asarray(t[0]["tokens"]) == np.asarray(j[0]["tokens"]), axis=1)))
            ratio = t_med / j_med
            if dtype == "float32" and impl == HEADLINE:
                ratio_fp32 = ratio
            parts.append(
                f"{names[impl]} {n_tokens / j_med:,.0f} tokens/s (best call {n_tokens / min(j_times):,.0f}), "
                f"**{ratio:.2f}x**, first call {j_first:.1f} s (compile ~{j_first - j_med:.1f} s), "
                f"greedy rows equal to transformers' {same}/{args.batch}, decode step: the model's forward (XLA ops)"
            )
        lines.append(f"**{dtype}**: " + "; ".join(parts))
    lines.append(f"headline ratio: {names[HEADLINE]}, float32, medians")
    return lines, ratio_fp32


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))

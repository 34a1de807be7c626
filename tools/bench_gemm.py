"""Our SFT step with the fp32 matrix products (projections, attention) on OpenBLAS (`ops.Policy(cpu_kernels=True)`) vs on XLA's dot, paired.

    .venv/bin/python tools/bench_gemm.py --steps 14

The benchmark model of `tools/bench.py sft` (random weights), batch 8 x 256, AdamW + clip; both
jitted steps live in one process and run alternately (ABBA order), so a change in machine load hits
both alike; the first two pairs are warm-up. Prints each side's median, the median of the paired
ratios (XLA time / OpenBLAS time) and the largest loss difference between the two runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=14, help="steps per side, the first two untimed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from bench_sft import BENCH_CONFIG, lm_batch, torch_model
    from flax import nnx

    from sftrl_jax import kernels, ops
    from sftrl_jax.models import from_pretrained
    from sftrl_jax.sft.train import make_train_step
    from sftrl_jax.train import optim
    from sftrl_jax.train.state import TrainState, rng_data

    if not kernels.gemm_available():
        print(f"kernels.gemm is unavailable here: {kernels._state.get('gemm_error') or kernels.error()}")
        return 1
    B, T = args.batch, args.length
    ids = np.random.default_rng(0).integers(0, BENCH_CONFIG["vocab_size"], size=(B, T), dtype=np.int64)
    batch = lm_batch(ids)
    steps, states = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        torch_model().save_pretrained(folder, safe_serialization=True)
        for gemm in (True, False):
            model = from_pretrained(folder, dtype=jnp.float32)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            cfg = optim.OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant", grad_clip=1.0)
            tx = optim.make_optimizer(cfg, params, total_steps=1000)
            states[gemm] = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng_data(0))
            policy = ops.Policy(platform="cpu", cpu_kernels=gemm)
            fn = make_train_step(graphdef, rest, tx, grad_accum=1, lr_fn=optim.schedule(cfg, 10), policy=policy)
            steps[gemm] = jax.jit(fn, donate_argnums=0)
    times: dict[bool, list[float]] = {True: [], False: []}
    losses: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.steps):
        for gemm in (True, False) if i % 2 else (False, True):
            t0 = time.perf_counter()
            states[gemm], m = steps[gemm](states[gemm], batch)
            loss = float(m["loss"])
            if i >= 2:
                times[gemm].append(time.perf_counter() - t0)
            losses[gemm].append(loss)
    ratio = statistics.median(x / g for g, x in zip(times[True], times[False]))
    diff = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
    print(
        f"model: Llama {BENCH_CONFIG['hidden_size']}d x {BENCH_CONFIG['num_hidden_layers']} layers, batch {B} x {T}, fp32"
    )
    print(f"openblas: median {statistics.median(times[True]):.3f} s/step over {len(times[True])} steps")
    print(f"xla dot:  median {statistics.median(times[False]):.3f} s/step over {len(times[False])} steps")
    print(f"largest loss difference over {args.steps} steps: {diff:.2e}")
    print(f"openblas speedup vs xla dot (median of paired ratios): {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

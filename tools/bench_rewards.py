"""`tools/bench.py rewards`: the device reward (jit, CPU device) next to the host verifier, same answers.

The answers are the verifier bench's model-like mix (`bench._answer_mix`, half GP-VL), tokenised once;
the device side scores them in batches of `--batch` token rows (one compiled shape, the compile timed
apart), the host side with `verifier.score` on the decoded texts, every answer new (cache cleared).
Both sides' rewards are compared answer by answer.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np


def bench_rewards(args, answer_mix) -> tuple[list[str], float]:
    import jax

    from sftrl_jax import envs
    from sftrl_jax.data import tokenizer as tokenizer_lib
    from sftrl_jax.envs.general_points import device_reward, verifier

    rng = np.random.default_rng(args.seed)
    items = answer_mix(rng, args.hands)
    tok = tokenizer_lib.load_tokenizer()
    ids = [list(x) for x in tok.hf([t for t, _, _ in items], add_special_tokens=False)["input_ids"]]
    texts = [tok.decode(x) for x in ids]
    length = -(-max(map(len, ids)) // 16) * 16
    states = [device_reward.puzzle_state(p, remaining=5, check_cards=not lo) for _, p, lo in items]
    fn = envs.device_reward_fn("gp-l", tok)
    call = jax.jit(fn.with_outcome)
    batches = []
    for lo in range(0, len(items), args.batch):
        rows = list(range(lo, min(lo + args.batch, len(items))))
        rows += [rows[-1]] * (args.batch - len(rows))
        arr = np.full((args.batch, length), tok.pad_id, np.int32)
        for r, i in enumerate(rows):
            arr[r, : len(ids[i])] = ids[i]
        lens = np.array([len(ids[i]) for i in rows], np.int32)
        state = jax.device_put(envs.stack_states([states[i] for i in rows]))
        batches.append((jax.device_put(arr), jax.device_put(lens), state))
    t = time.perf_counter()
    jax.block_until_ready(call(*batches[0]))
    compile_s = time.perf_counter() - t
    device = []
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        device.append(call(*batch))
    jax.block_until_ready(device)
    dev_wall, dev_cpu = time.perf_counter() - wall, time.process_time() - cpu
    dev_rewards = np.concatenate([np.asarray(r) for r, _ in device])[: len(items)]

    gc.collect()
    gc.freeze()
    verifier.clear_cache()
    wall, cpu = time.perf_counter(), time.process_time()
    host_rewards = np.array(
        [verifier.score(t, p, language_only=lo).reward for t, (_, p, lo) in zip(texts, items)], np.float32
    )
    host_wall, host_cpu = time.perf_counter() - wall, time.process_time() - cpu
    gc.unfreeze()
    n = len(items)
    # per CPU-second on both sides (all of XLA's threads for the device): the machine is shared
    device_rate, host_rate = n / dev_cpu, n / host_cpu
    mismatches = int(np.sum(dev_rewards != host_rewards))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"answers: {n} (the verifier bench's model-like mix, half gp-vl), {length} token ids per row, "
        f"{fn.max_bytes or length * 6} bytes per row on the device; load average {load:.2f}; {jax.device_count()} "
        f"XLA CPU device(s) on {os.cpu_count()} cpus",
        f"device reward: batch {args.batch}, compile {compile_s:.1f} s (once per shape), "
        f"{device_rate:,.0f} answers/s per CPU-second of all its threads ({n / dev_wall:,.0f} wall)",
        f"host verifier (verifier.score, one thread, every answer new): {host_rate:,.0f} answers/s per CPU-second "
        f"({n / host_wall:,.0f} wall)",
        f"device / host (per CPU-second): {device_rate / host_rate:.3f}x; rewards differing: {mismatches} of {n}",
        f"rewards answers/s: device {device_rate:,.0f}, host {host_rate:,.0f}",
    ]
    return lines, device_rate

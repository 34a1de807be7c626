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


# A tiny GRPO run (random 1-layer Llama, GP-L, the test suite's sizes): the share of an update in the
# rewards with env.reward_on_device off (env.step, which also writes the feedback) and on (the device
# scoring + env.step, still run for the feedback text and the env's advance).
_TINY_GRPO = {
    "model": {
        "preset": "llama-tiny",
        "text_overrides": {
            "vocab_size": 2048,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 1,
            "num_heads": 2,
            "num_kv_heads": 1,
            "head_dim": 32,
            "max_position_embeddings": 1024,
        },
    },
    "algo": "grpo",
    "env": {"task": "gp-l", "num_envs": 8},
    "sampling": {"max_new_tokens": 32, "temperature": 1.0},
    "grpo": {"group_size": 4, "samples_per_step": 8, "micro_batch": 8},
    "optim": {"lr": 1.0e-3, "grad_clip": 1.0},
    "eval": {"every": 0, "splits": []},
    "train": {
        "prompts_per_update": 2,
        "length_buckets": [512, 1024],
        "devices": 1,
        "progress": False,
        "async_checkpointing": False,
        "save_every": 1000,
    },
}


def grpo_share(updates: int, run_dir: str) -> list[str]:
    """Times `updates` GRPO updates (the first, compiles included, dropped) with the flag off and on."""
    import json

    import jax

    from sftrl_jax import config
    from sftrl_jax.rl.config import RLConfig
    from sftrl_jax.rl.train import Trainer

    lines = []
    for flag in (False, True):
        d = json.loads(json.dumps(_TINY_GRPO))
        d["env"]["reward_on_device"] = flag
        d["train"].update(run_dir=os.path.join(run_dir, f"on_{flag}"), updates=updates, resume=False)
        trainer = Trainer(config.from_dict(RLConfig, d))
        step_s = [0.0]
        for env in trainer.envs:
            step = env.step

            def timed(text, step=step, step_s=step_s):
                t = time.perf_counter()
                try:
                    return step(text)
                finally:
                    step_s[0] += time.perf_counter() - t

            env.step = timed
        totals, steps, device, turns = [], [], [], 0
        with jax.set_mesh(trainer.mesh):
            for k in range(updates):
                step_s[0], dev0 = 0.0, trainer.reward_scorer.seconds if flag else 0.0
                t = time.perf_counter()
                m = trainer.update()
                trainer.update_idx += 1
                if k:  # the first update compiles
                    totals.append(time.perf_counter() - t)
                    steps.append(step_s[0])
                    device.append((trainer.reward_scorer.seconds - dev0) if flag else 0.0)
                    turns += int(m["turns"])
        total, st, dv = sum(totals), sum(steps), sum(device)
        name = "on " if flag else "off"
        lines.append(
            f"GRPO update (tiny, gp-l, {updates - 1} timed, {turns} turns) reward_on_device {name}: "
            f"{total / len(totals):.2f} s per update; rewards {100 * (st + dv) / total:.1f}% of it "
            f"(env.step {100 * st / total:.1f}%, device scoring {100 * dv / total:.1f}%)"
        )
    return lines

"""`tools/bench.py rollout`: where a GP-L rollout spends its time, in the sampler or outside it.

64 GP-L environments are stepped in lock-step by `sftrl_jax.episodes.EpisodeRunner` (the code PPO
and evaluation use): every turn, each env's chat is tokenised, all contexts are sampled in one
`sampling.Policy` call, the answers are decoded and scored by the envs, and the conversations grow
by the answer and the verifier's feedback (up to 5 graded attempts, then the step-limit turn).

Model: the sampler benchmark's ~34M-parameter Llama (vocab 8192, width 512, MLP 1536, 8 layers,
8 heads, 4 kv heads; random weights, fp32). Tokenizer: the shipped 2048-id one. The model can sample
ids 2048..8191 that this tokenizer has no text for, so the benchmark's policy maps each sampled id
to id mod 2048 (inside the timed sampler call; a vector op on [64, new_tokens]) and cuts the
response at the first stop token, as `Policy` does: the text side then sees responses of the same
length and token mix as a real model's vocabulary would give it. Random weights answer garbage, so
every episode runs all its turns with growing contexts: the worst case for the host side.

The rollout runs twice with the same seeds: the first pass compiles every prompt-length bucket,
the second is timed. "In the sampler" is the wall time inside the policy calls; "outside" is the rest
of `EpisodeRunner.step` (chat tokenisation, decoding, env stepping + verification, resets),
broken down by wrapping those calls with timers.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

TEXT = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)


class _Timers:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] += time.perf_counter() - t

        return timed


class _MappedPolicy:
    """The sampler policy with sampled ids mapped into the tokenizer's range (see the module doc)."""

    def __init__(self, policy, vocab: int, stop_ids):
        self.policy, self.vocab, self.stop = policy, vocab, set(stop_ids)

    def __call__(self, contexts, images):
        out = []
        for ids, logprobs in self.policy(contexts, images):
            ids = (np.asarray(ids, np.int64) % self.vocab).tolist()
            n = next((i + 1 for i, t in enumerate(ids) if t in self.stop), len(ids))
            out.append((ids[:n], logprobs[:n]))
        return out


def _rollout(model, tok, args, timers: _Timers | None):
    from sftrl_jax import envs
    from sftrl_jax import episodes as rollout
    from sftrl_jax.sampling.policy import Policy

    policy = _MappedPolicy(
        Policy(model, tok, max_new_tokens=args.new_tokens, temperature=args.temperature, seed=args.seed),
        len(tok),
        tok.stop_ids,
    )
    env_list = [envs.make("gp-l", split="train") for _ in range(args.envs)]
    if timers is not None:
        policy = timers.wrap("sampler", policy)
        for e in env_list:
            e.step = timers.wrap("env step (verify)", e.step)
            e.reset = timers.wrap("env reset (deal)", e.reset)
    runner = rollout.EpisodeRunner(env_list, tok, policy, reset_fn=lambda i, ep: (args.seed * 100_003 + ep, None))
    if timers is not None:
        runner.tokenizer = _TimedTokenizer(tok, timers)
    t = time.perf_counter()
    turns = rollout.collect(runner, args.turns)
    total = time.perf_counter() - t
    return turns, total


class _TimedTokenizer:
    def __init__(self, tok, timers: _Timers):
        self._tok = tok
        self.chat_ids = timers.wrap("chat tokenisation", tok.chat_ids)
        self.decode = timers.wrap("decode", tok.decode)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def bench_rollout(args) -> tuple[list[str], float]:
    import jax
    from flax import nnx

    from sftrl_jax.data.tokenizer import load_tokenizer
    from sftrl_jax.models import LlamaConfig, create_model
    from sftrl_jax.parallel.placement import param_count

    tok = load_tokenizer()
    model = create_model(LlamaConfig.tiny(**TEXT), seed=args.seed)
    n_params = param_count(nnx.state(model, nnx.Param))
    t = time.perf_counter()
    _rollout(model, tok, args, None)  # compiles every length bucket
    warm = time.perf_counter() - t
    timers = _Timers()
    turns, total = _rollout(model, tok, args, timers)
    s = timers.seconds
    inside = s["sampler"]
    outside = total - inside
    frac = outside / total
    flat = [t for row in turns for t in row]
    ctx = [len(t.context_ids) for t in flat]
    resp = [len(t.response_ids) for t in flat]
    other = outside - sum(v for k, v in s.items() if k != "sampler")
    lines = [
        f"model: Llama {n_params / 1e6:.1f}M parameters (vocab 8192, d 512, F 1536, 8 layers, 8/4 heads), random "
        f"weights, fp32, {jax.devices()[0].platform}; shipped tokenizer (2048 ids; sampled ids mapped mod 2048)",
        f"rollout: {args.envs} GP-L envs x {args.turns} lock-step turns, max_new_tokens {args.new_tokens}, "
        f"temperature {args.temperature}; {len(flat)} turns, context tokens mean {np.mean(ctx):.0f} (max {max(ctx)}), "
        f"response tokens mean {np.mean(resp):.0f}",
        f"warm-up pass (compiles included): {warm:.1f} s; timed pass: {total:.2f} s",
        f"in the sampler: {inside:.2f} s ({inside / total:.1%}); outside: {outside:.3f} s",
        "outside, by part: "
        + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(s.items()) if k != "sampler")
        + f", other (runner bookkeeping) {other:.3f} s",
        f"rollout time outside the sampler: {100 * frac:.1f}%",
    ]
    return lines, frac

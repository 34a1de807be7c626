"""Token log-probs, entropies and argmax from the final hidden states, without a whole-vocabulary
logits tensor: the LM head is applied to one chunk of the sequence at a time.

    out = chunked.head_logprobs(hidden, model.lm_head_matrix(), targets, temperature=T, entropy=True)
    out["logp"]     # [B, T] log_softmax(logits / T)[target]      (= token_logprobs of the full logits)
    out["entropy"]  # [B, T] entropy of softmax(logits / T)        (with entropy=True)
    out["argmax"]   # [B, T] argmax of the logits, int32            (with argmax=True)

At 11B (V = 128256) one fp32 logits copy of 4 x 4096 tokens is 8.4 GB and the backward of
`log_softmax` keeps several alive. Here a `lax.scan` runs over chunks of the sequence; each chunk's
logits [B, t, V] are computed (through `ops.dense`, fp32 out), divided by the temperature, reduced
to [B, t] and dropped, and `jax.checkpoint` makes the backward recompute them chunk by chunk
instead of saving them (the cost: the head's forward product runs twice, ~+2% of an 11B step's
FLOPs). The per-chunk formulas are `token_logprobs` and the full-logits entropy, so the values
equal the unchunked ones up to the products' rounding (tests/sampling/test_chunked_logprobs.py:
1e-6 in fp32). That rounding depends on the product's shape: XLA:CPU's logits of 24 rows and of 111
differ by up to 2 ulp (2.4e-6 at |logit| ~10), each within 2 ulp of the exact value.

Chunk length: the largest t whose chunk logits stay under `CHUNK_BYTES` (256 MiB) per device,
counting the rows and vocab columns each device holds under the current mesh's batch / vocab
sharding (`parallel.rules`), then evened out over the chunks so that padding is under one token per
chunk. `chunk_tokens=` fixes t instead. A sequence that fits in one chunk is computed directly, as
before (no scan, no recompute).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sftrl_jax import ops
from sftrl_jax.parallel import rules

CHUNK_BYTES = 256 * 2**20  # per-device bytes of one chunk's fp32 logits
LOGITS = ("batch", "seq", "act_vocab")


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target_t | prefix) [B, T] from logits [B, T, V], computed in fp32 (the one definition
    every consumer scores with; `logprobs` re-exports it)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - logz


def token_entropy(z: jax.Array) -> jax.Array:
    """Entropy of softmax(z) over the last axis, fp32: H = logsumexp(z) - sum softmax(z) z
    (the formula of `rl.losses.token_entropy`)."""
    z = z.astype(jnp.float32)
    return jax.nn.logsumexp(z, axis=-1) - (jax.nn.softmax(z, axis=-1) * z).sum(-1)


def chunk_length(batch: int, length: int, vocab: int, *, budget_bytes: int | None = None) -> int:
    """Tokens per chunk: the largest whose fp32 logits [batch, t, vocab] take at most `budget_bytes`
    (default `CHUNK_BYTES`) per device under the current mesh (`jax.set_mesh`; none: one device),
    evened out over the chunks."""
    budget_bytes = CHUNK_BYTES if budget_bytes is None else budget_bytes
    mesh = jax.sharding.get_abstract_mesh()
    rows, cols = batch, vocab
    if not mesh.empty:
        spec = rules.logical_to_spec(LOGITS, (batch, length, vocab), dict(mesh.shape))
        spec = tuple(spec) + (None,) * (3 - len(spec))
        rows //= _shards(spec[0], mesh)
        cols //= _shards(spec[2], mesh)
    t = max(1, min(length, budget_bytes // (4 * rows * cols)))
    n = math.ceil(length / t)
    return math.ceil(length / n)


def _shards(entry, mesh) -> int:
    if entry is None:
        return 1
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[a] for a in axes)


def head_logprobs(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    temperature=1.0,
    entropy: bool = False,
    argmax: bool = False,
    chunk_tokens: int | None = None,
) -> dict[str, jax.Array]:
    """hidden [B, T, D] (the model's final normed states), head [D, V] (`model.lm_head_matrix()`),
    targets [B, T] -> {"logp": [B, T]} (+ "entropy" [B, T], + "argmax" [B, T] int32) of
    logits = hidden @ head in fp32, divided by `temperature` (argmax: of the undivided logits; the
    same token for any temperature > 0). `chunk_tokens`: tokens per chunk (default `chunk_length`)."""
    b, t, _ = hidden.shape
    w = head.astype(hidden.dtype)
    c = chunk_tokens if chunk_tokens is not None else chunk_length(b, t, w.shape[-1])
    c = max(1, min(int(c), t))

    def reduce(h, y):  # [B, c, D], [B, c] -> dict of [B, c]
        logits = rules.constrain(ops.dense(h, w, out_dtype=jnp.float32), LOGITS)  # [B, c, V]
        z = logits / temperature
        out = {"logp": token_logprobs(z, y)}
        if entropy:
            out["entropy"] = token_entropy(z)
        if argmax:
            out["argmax"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return out

    if c >= t:
        return reduce(hidden, targets)
    n = math.ceil(t / c)
    pad = n * c - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, -1).swapaxes(0, 1)  # [n, B, c, D]
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)  # [n, B, c]

    # Only the chunk's inputs are saved for the backward; its logits are recomputed there.
    @jax.checkpoint
    def body(carry, xs):
        return carry, reduce(*xs)

    _, out = jax.lax.scan(body, None, (h, y))
    return {k: v.swapaxes(0, 1).reshape(b, n * c)[:, :t] for k, v in out.items()}

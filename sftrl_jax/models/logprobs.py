"""The one forward to token log-probs: every loss, pass and metric that scores tokens calls `forward`.

    out = logprobs.forward(model, batch, temperature=T, entropy=True, argmax=True, hidden=True)
    out["logp"]     # [B, T] log_softmax(logits / T)[targets]       (fp32)
    out["entropy"]  # [B, T] entropy of softmax(logits / T)          (with entropy=True)
    out["argmax"]   # [B, T] argmax of the logits, int32             (with argmax=True)
    out["hidden"]   # [B, T, D] the final normed hidden states       (with hidden=True: PPO's value head)

`batch` holds `input_ids`, `attention_mask`, `targets` and, for Mllama with images, the `IMAGE_KEYS`
(the one list of image inputs a batch carries). Users: the SFT loss and eval loss, PPO (policy and
value), GRPO, the trainer's old / reference log-probs, and the sampler's teacher-forced check
(`sampling.logprobs`); tests/models/test_logprobs.py fails if another module computes token log-probs
from a model.

The LM head is applied without a whole-vocabulary logits tensor (`head_logprobs`). At 11B (V = 128256)
one fp32 logits copy of 4 x 4096 tokens is 8.4 GB and the backward of `log_softmax` keeps several
alive. Here a `lax.scan` runs over chunks of the sequence; each chunk's logits [B, t, V] are computed
(through `ops.dense`, fp32 out), divided by the temperature, reduced to [B, t] and dropped, and
`jax.checkpoint` makes the backward recompute them chunk by chunk instead of saving them (the cost:
the head's forward product runs twice, ~+2% of an 11B step's FLOPs). The per-chunk formulas are
`token_logprobs` and the full-logits entropy, so the values equal the unchunked ones up to the
products' rounding (tests/models/test_logprobs.py: 1e-6 in fp32). That rounding depends on the
product's shape: XLA:CPU's logits of 24 rows and of 111 differ by up to 2 ulp (2.4e-6 at |logit|
~10), each within 2 ulp of the exact value.

Chunk length: the largest t whose chunk logits stay under `CHUNK_BYTES` (256 MiB) per device,
counting the rows and vocab columns each device holds under the current mesh's batch / vocab
sharding (`parallel.rules`), then evened out over the chunks so that padding is under one token per
chunk. `chunk_tokens=` fixes t instead. A sequence that fits in one chunk is computed directly (no
scan, no recompute).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sftrl_jax import ops
from sftrl_jax.parallel import rules

CHUNK_BYTES = 256 * 2**20  # per-device bytes of one chunk's fp32 logits
LOGITS = ("batch", "seq", "act_vocab")

# The image inputs a batch may carry into the model (Mllama): one list for SFT data, RL batches,
# the sampler's inputs and the log-prob forward.
PIXEL_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")  # what the image processor gives
IMAGE_KEYS = (*PIXEL_KEYS, "cross_attention_mask")


def model_inputs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The keyword inputs of the model call besides `input_ids`: the attention mask and the image
    inputs present in `batch`."""
    out = {"attention_mask": batch["attention_mask"]}
    out.update({k: batch[k] for k in IMAGE_KEYS if k in batch})
    return out


def forward(
    model,
    batch: dict[str, jax.Array],
    *,
    temperature=1.0,
    entropy: bool = False,
    argmax: bool = False,
    hidden: bool = False,
    chunk_tokens: int | None = None,
) -> dict[str, jax.Array]:
    """The model's token log-probs of `batch["targets"]` at logits / `temperature` (fp32), from one
    forward over `batch` (right padded rows, image inputs where present); see the module docstring
    for what `entropy`, `argmax` and `hidden` add."""
    out = model(batch["input_ids"], return_logits=False, **model_inputs(batch))
    result = head_logprobs(
        out.hidden_states,
        model.lm_head_matrix(),
        batch["targets"],
        temperature=temperature,
        entropy=entropy,
        argmax=argmax,
        chunk_tokens=chunk_tokens,
    )
    if hidden:
        result["hidden"] = out.hidden_states
    return result


def full_logprobs(model, batch: dict[str, jax.Array]) -> jax.Array:
    """log_softmax of the whole next-token distribution [B, T, V] in fp32 (the KL diagnostics need
    every token's probability, not only the targets'; `forward` is the one for token log-probs)."""
    logits = model(batch["input_ids"], **model_inputs(batch))
    logits = getattr(logits, "logits", logits)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target_t | prefix) [B, T] from logits [B, T, V], computed in fp32 (the one definition
    every consumer scores with; `logprobs` re-exports it)."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - logz


def token_entropy(z: jax.Array) -> jax.Array:
    """Entropy of softmax(z) over the last axis, fp32: H = logsumexp(z) - sum softmax(z) z."""
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

"""`models.logprobs.head_logprobs`: the LM head applied chunk by chunk over the sequence gives the
unchunked log-probs, entropies and argmax (and their gradients) within 1e-6 in fp32, for tied and
untied heads, temperatures != 1 and lengths that are not a multiple of the chunk; and the compiled
SFT step's temporaries shrink against the whole-logits loss."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sftrl_jax import ops
from sftrl_jax.models import LlamaConfig, MllamaConfig, create_model
from sftrl_jax.models import logprobs as chunked
from sftrl_jax.sft import losses as sft_losses
from sftrl_jax.sft import train as sft_train
from sftrl_jax.train import accumulate as accum_lib
from sftrl_jax.train import optim
from sftrl_jax.train.state import TrainState, rng_data

TOL = dict(rtol=1e-6, atol=1e-6)


def unchunked(hidden, head, targets, temperature):
    logits = ops.dense(hidden, head, out_dtype=jnp.float32)  # the models' `lm_logits`
    z = logits / temperature
    return {
        "logp": chunked.token_logprobs(z, targets),
        "entropy": chunked.token_entropy(z),
        "argmax": jnp.argmax(logits, axis=-1).astype(jnp.int32),
    }


def objective(fn):
    """A scalar that weights every token's log-prob and entropy differently, so the gradient checks
    each position's contribution."""

    def f(hidden, head, targets, weights):
        out = fn(hidden, head, targets)
        return (out["logp"] * weights).sum() + (out["entropy"] * weights[::-1]).sum()

    return f


@pytest.mark.parametrize(("length", "chunk", "temperature"), [(37, 8, 0.7), (64, 16, 1.0), (33, 64, 0.3), (5, 1, 2.0)])
def test_values_and_gradients_equal_unchunked(length, chunk, temperature):
    b, d, v = 3, 16, 300
    k1, k2, k3, k4 = jax.random.split(jax.random.key(length), 4)
    hidden = jax.random.normal(k1, (b, length, d), jnp.float32)
    # |logits| <~ 2.5: at |logits| ~ 10 XLA:CPU's product alone rounds differently for 24 rows than
    # for 111 (2.4e-6 apart, 2 ulp; each within 2 ulp of the exact value), which no chunking avoids.
    head = jax.random.normal(k2, (d, v), jnp.float32) * 0.15
    targets = jax.random.randint(k3, (b, length), 0, v)
    weights = jax.random.uniform(k4, (b, length))

    def chunk_fn(h, w, y):
        return chunked.head_logprobs(h, w, y, temperature=temperature, entropy=True, argmax=True, chunk_tokens=chunk)

    got = jax.jit(chunk_fn)(hidden, head, targets)
    want = unchunked(hidden, head, targets, temperature)
    for key in ("logp", "entropy"):
        np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=key)
    np.testing.assert_array_equal(got["argmax"], want["argmax"])

    grad = jax.jit(jax.grad(objective(chunk_fn), argnums=(0, 1)))
    grad_ref = jax.jit(jax.grad(objective(lambda h, w, y: unchunked(h, w, y, temperature)), argnums=(0, 1)))
    for g, r, name in zip(grad(hidden, head, targets, weights), grad_ref(hidden, head, targets, weights), "hw"):
        np.testing.assert_allclose(g, r, **TOL, err_msg=f"d/d{name}")


def test_chunk_length():
    v = 128256
    assert chunked.chunk_length(8, 4096, v) == 64  # 256 MiB / (8 rows x V x 4 B) = 65 -> 64 chunks of 64
    assert chunked.chunk_length(2, 100, v) == 100  # fits in one chunk
    assert chunked.chunk_length(8, 1000, v, budget_bytes=8 * v * 4 * 300) == 250  # 300 -> 4 chunks of 250
    mesh = jax.make_mesh((1, 8, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:8])
    with jax.set_mesh(mesh):  # one row per device: 8x the tokens per chunk
        assert chunked.chunk_length(8, 4096, v) == 512


MODELS = {
    "llama-untied": lambda: LlamaConfig.tiny(vocab_size=512),
    "llama-tied": lambda: LlamaConfig.tiny(vocab_size=512, tie_word_embeddings=True),
    "mllama-tied": lambda: MllamaConfig.tiny(tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_head_matches_model_logits(name):
    """`lm_head_matrix()` with the chunked head gives the model's own logits' log-probs, and the
    same parameter gradients (tied: through the embedding)."""
    model = create_model(MODELS[name](), seed=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    vocab = model.config.text.vocab_size
    ids = jax.random.randint(jax.random.key(0), (2, 40), 3, vocab)
    targets = jnp.roll(ids, -1, axis=1)
    mask = jnp.ones_like(ids).at[1, 30:].set(0)
    temperature = 0.6

    def loss(params, chunk):
        m = nnx.merge(graphdef, params, rest)
        if chunk is None:
            z = m(ids, attention_mask=mask).logits / temperature
            logp, ent = chunked.token_logprobs(z, targets), chunked.token_entropy(z)
        else:
            out = m(ids, attention_mask=mask, return_logits=False)
            head = chunked.head_logprobs(
                out.hidden_states,
                m.lm_head_matrix(),
                targets,
                temperature=temperature,
                entropy=True,
                chunk_tokens=chunk,
            )
            logp, ent = head["logp"], head["entropy"]
        # a token mean, as the SFT and GRPO losses take
        return ((logp + 0.1 * ent) * mask).sum() / mask.sum(), (logp, ent)

    (l0, (logp0, ent0)), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, None)
    (l1, (logp1, ent1)), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, 16)
    np.testing.assert_allclose(logp1, logp0, **TOL)
    np.testing.assert_allclose(ent1, ent0, **TOL)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, **TOL, err_msg=jax.tree_util.keystr(path))


def _old_train_step(graphdef, rest, tx, *, lr_fn):
    """The SFT step as it was before chunking: the model's whole fp32 logits, then the loss."""

    def loss_fn(params, mb):
        model = nnx.merge(graphdef, params, rest)
        out = model(mb["input_ids"], **chunked.model_inputs(mb))
        logp = chunked.token_logprobs(out.logits, mb["targets"])
        _, aux = sft_losses.sft_loss_from_logp(logp, jnp.argmax(out.logits, -1), mb["targets"], mb["loss_mask"])
        return aux["nll_sum"], aux

    def train_step(state, batch):
        grads, aux = accum_lib.accumulate(loss_fn, state.params, batch, n_micro=1)
        denom = jnp.maximum(aux["tokens"].sum(), 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        return accum_lib.apply(state, grads, tx, lr_fn=lr_fn)

    return train_step


@pytest.mark.slow  # 15 s cold; a compiled-memory guard
def test_sft_step_temporaries_shrink(monkeypatch):
    """Vocab 32000, 2 x 1024 tokens: one logits copy is 262 MB; chunks of 16 MiB (64 tokens)."""
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 16 * 2**20)
    config = LlamaConfig.tiny(vocab_size=32000, max_position_embeddings=1024, num_layers=1)
    graphdef, params, rest = nnx.split(create_model(config), nnx.Param, ...)
    ocfg = optim.OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant")
    tx = optim.make_optimizer(ocfg, params, total_steps=4)
    lr_fn = optim.schedule(ocfg, 4)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng_data(0))
    b, t = 2, 1024
    batch = {
        "input_ids": jnp.zeros((b, t), jnp.int32),
        "attention_mask": jnp.ones((b, t), jnp.int32),
        "targets": jnp.zeros((b, t), jnp.int32),
        "loss_mask": jnp.ones((b, t), jnp.int32),
    }
    steps = {
        "chunked": sft_train.make_train_step(graphdef, rest, tx, grad_accum=1, lr_fn=lr_fn),
        "whole": _old_train_step(graphdef, rest, tx, lr_fn=lr_fn),
    }
    temp = {k: jax.jit(f).lower(state, batch).compile().memory_analysis().temp_size_in_bytes for k, f in steps.items()}
    print(f"temp_size_in_bytes: {temp}")
    logits_bytes = b * t * config.text.vocab_size * 4
    assert temp["whole"] > 2 * logits_bytes  # several whole-logits copies alive
    assert temp["chunked"] < logits_bytes / 2 < temp["whole"] / 4, temp


def test_forward_equals_the_models_logits_log_probs():
    """`logprobs.forward`, the one forward to token log-probs, gives log_softmax(logits / T)[targets]
    of the model's own logits, the argmax and the final hidden states."""
    model = create_model(MODELS["llama-untied"](), seed=2)
    vocab = model.config.text.vocab_size
    ids = jax.random.randint(jax.random.key(1), (2, 24), 3, vocab)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "targets": jnp.roll(ids, -1, axis=1)}
    out = chunked.forward(model, batch, temperature=0.7, entropy=True, argmax=True, hidden=True, chunk_tokens=8)
    z = model(ids, attention_mask=batch["attention_mask"]).logits / 0.7
    np.testing.assert_allclose(out["logp"], chunked.token_logprobs(z, batch["targets"]), **TOL)
    np.testing.assert_allclose(out["entropy"], chunked.token_entropy(z), **TOL)
    np.testing.assert_array_equal(out["argmax"], jnp.argmax(z, axis=-1))
    assert out["hidden"].shape == (2, 24, model.config.text.hidden_size)


# Code that computes token log-probs from a model: only models/logprobs.py may hold it (issue #31).
_FORWARD_PATTERNS = {
    "return_logits=False": {"models/logprobs.py", "models/mllama.py", "models/text.py"},
    ".lm_head_matrix()": {"models/logprobs.py"},
    "head_logprobs(": {"models/logprobs.py"},
    "jax.nn.log_softmax(": {"models/logprobs.py", "sampling/methods.py"},  # the sampler's draw
    "jax.nn.logsumexp(": {"models/logprobs.py"},
}


def test_one_forward_to_token_log_probs():
    root = pathlib.Path(__file__).resolve().parents[2] / "sftrl_jax"
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, allowed in _FORWARD_PATTERNS.items():
                if pattern in code and rel not in allowed and not code.lstrip().startswith(('"', "'")):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "token log-probs computed outside models/logprobs.py:\n" + "\n".join(found)
